#!/usr/bin/env bash
# Builds TorchServe archives (.mar) of the project's models into model_store/.
#
#   ./archive.sh [--profile demo|pretrained] [--target T] [--version V]
#                [--name NAME] [--weights DIR|FILE] [--config-tree DIR] [--store DIR] [--handler FILE]
#                [--force] [MODEL...]
#
# MODEL is one of the model folders in handlers/ (cam, ddpm, sd15); none named = every model
# that has weights for the profile. An archive holds the serving core, the TorchServe adapter and
# its own model folder only; its format is the config's `archive_format` (default: a .mar zip). T (default cpu): any name with model_configs/<model>/T.yaml for
# every model built (MODEL_CONFIGS=DIR reads the configs from DIR instead).
# --version other than 1.0 writes <name>-<version>.mar. Weights come from
# weights/<profile>/<model>/ unless --weights (one model only) or <MODEL>_WEIGHTS
# (e.g. SD15_WEIGHTS=/data/sd15) points elsewhere. For sd15 that may also be a single-file
# checkpoint (one .safetensors in the original layout, as A1111 / ComfyUI keep them): it is checked
# and converted to a diffusers directory (python -m weights.single_file) with the config tree
# weights/sd15-config, or --config-tree DIR (SD15_CONFIG_TREE=DIR) for a model with other configs;
# a file that is no SD1.5 checkpoint is refused in one line (docs/your-own-sd.md).
# --handler FILE (one model only) archives FILE as the entry point instead of
# handlers/MODEL/handler.py, e.g. a test double that subclasses it.
# With ddpm or sd15 (or named: MODEL jobs) it also builds jobs.mar, cancel and status by request
# id for them (handlers/jobs/, docs/jobs.md): no weights, one config for every target
# (model_configs/jobs.yaml).
# The archive is built in a temp dir and moved into place, so a failed run never leaves a
# half-written archive; an unchanged input set is detected by a fingerprint and skipped.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
profile="${PROFILE:-demo}"
target="${TARGET:-cpu}"
version="${VERSION:-1.0}"
store="${MODEL_STORE:-$here/model_store}"
configs="${MODEL_CONFIGS:-$here/model_configs}"
config_tree="${SD15_CONFIG_TREE:-$here/weights/sd15-config}"
name=""
weights_override=""
handler_override=""
force=0
models=()

die() { echo "archive.sh: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile="${2:?--profile needs a value}"; shift 2 ;;
    --target) target="${2:?--target needs a value}"; shift 2 ;;
    --version) version="${2:?--version needs a value}"; shift 2 ;;
    --name) name="${2:?--name needs a value}"; shift 2 ;;
    --weights) weights_override="${2:?--weights needs a value}"; shift 2 ;;
    --config-tree) config_tree="${2:?--config-tree needs a value}"; shift 2 ;;
    --store) store="${2:?--store needs a value}"; shift 2 ;;
    --handler) handler_override="${2:?--handler needs a value}"; shift 2 ;;
    --force) force=1; shift ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) models+=("$1"); shift ;;
  esac
done

case "$profile" in demo|pretrained) ;; *) die "unknown profile '$profile' (demo or pretrained)" ;; esac
[[ "$target" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]] || die "invalid target name '$target'"
[ -d "$configs" ] || die "model configs directory not found: $configs"
configs="$(cd "$configs" && pwd)"

python="$here/.venv/bin/python"
[ -x "$python" ] || python="$(command -v python3 || true)"
archiver="$here/.venv/bin/torch-model-archiver"
[ -x "$archiver" ] || archiver="$(command -v torch-model-archiver || true)"
[ -n "$archiver" ] || die "torch-model-archiver not found: run 'make setup' (or pip install torch-model-archiver==0.12.0)"

known=()
for f in "$here"/handlers/*/handler.py; do
  m="$(basename "$(dirname "$f")")"
  [ -d "$configs/$m" ] && known+=("$m")
done
# What an archive of model m packs: the handlers package's core, adapter and m's own folder.
code_of() { echo handlers/__init__.py handlers/core handlers/adapter "handlers/$1"; }

weights_for() {  # model -> weights directory (or sd15's single file)
  local var
  var="$(echo "$1" | tr '[:lower:]' '[:upper:]')_WEIGHTS"
  if [ -n "$weights_override" ]; then echo "$weights_override"
  elif [ -n "${!var:-}" ]; then echo "${!var}"
  else echo "$here/weights/$profile/$1"; fi
}

jobs=0
if [ ${#models[@]} -eq 0 ]; then
  for m in "${known[@]}"; do [ -e "$(weights_for "$m")" ] && models+=("$m"); done
  [ ${#models[@]} -gt 0 ] || die "no weights found under weights/$profile/ (run 'make weights PROFILE=$profile')"
fi
if [[ " ${models[*]} " == *" jobs "* ]]; then
  jobs=named; rest=(); for m in "${models[@]}"; do [ "$m" = jobs ] || rest+=("$m"); done; models=("${rest[@]}")
fi
[ "$jobs" = named ] || [[ " ${models[*]} " != *" ddpm "* && " ${models[*]} " != *" sd15 "* ]] || jobs=1
if [ "$jobs" != 0 ] && [ ! -f "$configs/jobs.yaml" ]; then
  # Named, it must be built; beside ddpm / sd15 from a configs dir without it (MODEL_CONFIGS), it is left out.
  [ "$jobs" != named ] || die "no config for the jobs archive: $configs/jobs.yaml"
  echo "archive.sh: $configs/jobs.yaml not found: the jobs archive (cancel and status by request id) is not built"
  jobs=0
fi
[ ${#models[@]} -gt 0 ] || [ "$jobs" != 0 ] || die "no model to build"
[ -z "$weights_override" ] || [ ${#models[@]} -eq 1 ] || die "--weights applies to one model at a time"
[ -z "$name" ] || [ ${#models[@]} -eq 1 ] || die "--name applies to one model at a time"
[ -z "$handler_override" ] || [ ${#models[@]} -eq 1 ] || die "--handler applies to one model at a time"
[ -z "$handler_override" ] || [ -f "$handler_override" ] || die "handler file not found: $handler_override"
for m in "${models[@]}"; do
  [[ " ${known[*]} " == *" $m "* ]] || die "unknown model '$m' (known: ${known[*]})"
done

# A target is a name with a model config for every model being built (nothing lists them).
targets_of() { local f; for f in "$configs/$1"/*.yaml; do [ ! -f "$f" ] || basename "$f" .yaml; done | LC_ALL=C sort; }
[ ${#models[@]} -gt 0 ] && available="$(targets_of "${models[0]}")" || available="$target"
for m in "${models[@]}"; do
  available="$(comm -12 <(echo "$available") <(targets_of "$m"))"
done
available="$(echo "$available" | tr '\n' ' ' | sed 's/ *$//')"
[[ " $available " == *" $target "* ]] || die "unknown target '$target' for ${models[*]} (available: ${available:-none}; a target is model_configs/<model>/<target>.yaml)"

mkdir -p "$store"

fingerprint() {  # every input that changes the archive: handler code, config, weights, options
  local m="$1" wdir="$2"
  {
    echo "$profile $target $version $3 $4"
    (cd "$here" && find $(code_of "$m") -name '*.py' -type f | LC_ALL=C sort | xargs sha256sum)
    [ -z "$handler_override" ] || sha256sum "$handler_override"
    (cd "$configs" && sha256sum "$m/$target.yaml")
    # Size + mtime of each weights file: cheap for multi-GB weights, still catches rebuilds.
    if [ -f "$wdir" ]; then
      # A single file: the converter and the config tree it is read with are inputs too.
      find -L "$wdir" -printf 'single file %s %T@\n'
      (cd "$here" && sha256sum weights/single_file.py)
      (cd "$config_tree" && find -L . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
    else
      (cd "$wdir" && find -L . -type f -printf '%p %s %T@\n' | LC_ALL=C sort)
    fi
  } | sha256sum | cut -d' ' -f1
}

# The weights' content: "Model hash" in the PNGs a model writes (weights/sha256.py: a directory's
# files' paths and bytes, a single file's own sha256; cached per file by size and mtime).
weights_sha256() { local path; path="$(realpath -s "$1")" && (cd "$here" && "$python" -m weights.sha256 "$path"); }

# Unchanged inputs (the same fingerprint as the archive's stamp) leave the archive as it is.
up_to_date() {  # out stamp fingerprint name
  [ "$force" = 0 ] && [ -e "$1" ] && [ -f "$2" ] && [ "$(cat "$2")" = "$3" ] || return 1
  echo "archive.sh: $4 is up to date ($1)"
}
# Each archive is built in a temp dir of the store ($work) and moved into place when whole.
start_build() {  # name
  work="$(mktemp -d "$store/.build-$1.XXXXXX")"; copying=""
  trap '[ -z "$copying" ] || kill "$copying" 2>/dev/null; rm -rf "$work"' EXIT
  mkdir -p "$work/extra" "$work/out" "$work/tmp"
}
finish_build() {  # built out stamp fingerprint
  rm -rf "$2" "$3"
  mv "$1" "$2"
  echo "$4" > "$3"
  rm -rf "$work"; trap - EXIT
}

for m in "${models[@]}"; do
  wdir="$(weights_for "$m")"
  single=""
  if [ -f "$wdir" ]; then
    [ "$m" = sd15 ] || die "weights for '$m' must be a directory: a single-file checkpoint ($wdir) is read for sd15 only"
    [ -f "$config_tree/model_index.json" ] || die "config tree not found: $config_tree (no model_index.json)"
    single="$(realpath "$wdir")"; wdir="$single"; config_tree="$(cd "$config_tree" && pwd)"
  fi
  [ -e "$wdir" ] || die "weights directory for '$m' not found: $wdir (build it with 'make weights PROFILE=$profile' or set $(echo "$m" | tr '[:lower:]' '[:upper:]')_WEIGHTS)"
  config="$configs/$m/$target.yaml"
  [ -f "$config" ] || die "no model config for '$m' on target '$target': $config"
  mname="${name:-$m}"
  # Version 1.0 is <name>.mar; other versions get their own file (cam-2.0.mar), so both
  # versions of a model can sit in the store and be registered side by side.
  fname="$mname"; [ "$version" = "1.0" ] || fname="$mname-$version"
  # Diffusion pipelines are GBs in the pretrained profile: their configs say no-archive (stored
  # unpacked), so neither archiving nor loading spends minutes compressing and unzipping them.
  format="$(sed -n 's/^archive_format: *\([A-Za-z-]*\).*/\1/p' "$config")"; format="${format:-default}"
  case "$format" in
    default) out="$store/$fname.mar" ;;
    no-archive) out="$store/$fname" ;;
    *) die "$config: archive_format '$format' is not supported (default or no-archive)" ;;
  esac
  fp="$(fingerprint "$m" "$wdir" "$mname" "$format")"
  stamp="$store/.$fname.fingerprint"
  up_to_date "$out" "$stamp" "$fp" "$fname" && continue

  start_build "$fname"
  start=$(date +%s.%N)
  if [ -n "$single" ]; then
    # One line on stderr when the file is refused; the trap removes the build dir.
    (cd "$here" && "$python" -m weights.single_file "$single" --out "$work/weights" --config "$config_tree") || exit 1
    wdir="$work/weights"
  fi
  if [ "$format" = "no-archive" ] && [ -z "$single" ]; then
    # The weights are copied while they are hashed and the archiver runs (the copy is mostly the
    # kernel's work). -L: a hub cache snapshot is a tree of symlinks into ../../blobs; copy the files.
    cp -rL --reflink=auto "$wdir/." "$work/copy" & copying=$!
  fi
  (cd "$here" && find $(code_of "$m") -name '*.py' -type f -exec cp --parents {} "$work/extra/" \;)
  # What the handler's describe reports (GET /models/<name>?customized=true).
  digest="$(weights_sha256 "${single:-$wdir}")" || die "hashing the weights of $mname failed"
  printf '{"profile": "%s", "target": "%s", "version": "%s", "fingerprint": "%s", "weights_sha256": "%s"}\n' \
    "$profile" "$target" "$version" "$fp" "$digest" > "$work/extra/archive.json"
  # The archiver copies its inputs twice for no-archive (to a temp dir, then to the output):
  # for GBs of weights, give it only the code and copy the weights into its output once.
  [ "$format" = "no-archive" ] || ln -s "$(cd "$wdir" && pwd)" "$work/extra/weights"
  echo "archive.sh: building $mname ($m, profile $profile, target $target, version $version, format $format) from ${single:-$wdir}"
  TMPDIR="$work/tmp" "$archiver" --model-name "$mname" --version "$version" \
    --handler "${handler_override:-$here/handlers/$m/handler.py}" --extra-files "$work/extra" \
    --config-file "$config" --archive-format "$format" --export-path "$work/out" \
    || die "torch-model-archiver failed for $mname"
  built="$work/out/$mname"; [ "$format" = "no-archive" ] || built="$built.mar"
  if [ "$format" = "no-archive" ]; then
    # A converted single file is already a copy of its own in the build dir.
    if [ -n "$single" ]; then mv "$wdir" "$built/weights"
    else
      wait "$copying" || { copying=""; die "copying the weights of $mname failed"; }
      copying=""; mv "$work/copy" "$built/weights"
    fi
  fi
  finish_build "$built" "$out" "$stamp" "$fp"
  echo "archive.sh: wrote $out ($(du -sh "$out" | cut -f1), $(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN{printf "%.1f", e-s}') s)"
done

# The jobs archive: the code of handlers/jobs (and the core it imports), its one config. Built
# and moved into place like the others; unchanged inputs are skipped.
if [ "$jobs" != 0 ]; then
  fp="$({ echo "$version"; (cd "$here" && find $(code_of jobs) -name '*.py' -type f | LC_ALL=C sort | xargs sha256sum)
          sha256sum < "$configs/jobs.yaml"; } | sha256sum | cut -d' ' -f1)"
  fname="jobs"; [ "$version" = "1.0" ] || fname="jobs-$version"
  out="$store/$fname.mar"; stamp="$store/.$fname.fingerprint"
  if ! up_to_date "$out" "$stamp" "$fp" "$fname"; then
    start_build "$fname"
    (cd "$here" && find $(code_of jobs) -name '*.py' -type f -exec cp --parents {} "$work/extra/" \;)
    TMPDIR="$work/tmp" "$archiver" --model-name jobs --version "$version" --handler "$here/handlers/jobs/handler.py" \
      --extra-files "$work/extra" --config-file "$configs/jobs.yaml" --export-path "$work/out" \
      || die "torch-model-archiver failed for jobs"
    finish_build "$work/out/jobs.mar" "$out" "$stamp" "$fp"
    echo "archive.sh: wrote $out ($(du -sh "$out" | cut -f1))"
  fi
fi
