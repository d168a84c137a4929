"""Builders for the weights the archives are made from (demo profile) and preparers for the pretrained profile."""
