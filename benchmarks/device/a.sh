# call A: wheels (all but transformers) + data
t0=$(date +%s); source benchmarks/device/env.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .dev/a/w/*.whl 2>&1 | tail -3
mkdir -p /tmp/groot /tmp/gcache/packages /tmp/mt && tar -xJf .dev/a/data.tar.xz -C /tmp/groot && cp params.yaml /tmp/groot/
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
python3 -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.is_available())"
ls /tmp/groot/data | tr '\n' ' '; ls /tmp/site | wc -l; echo "A took $(( $(date +%s)-t0 )) s"
