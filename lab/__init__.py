"""The fine-tuning lab (`make compare`): shifted digits, fine-tuning cam, and comparing served versions."""
