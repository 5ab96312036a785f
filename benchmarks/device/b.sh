# call B: chunk 1 (transformers wheel + start of the GGUF); import smoke; warm Prefect and MLflow databases
t0=$(date +%s); source benchmarks/device/env.sh
cp .dev/b/m00 /tmp/mt/ && cd /tmp/mt && (tar -xf m00 2>/dev/null; true) && cd - >/dev/null
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/mt/transformers-5.24.0-py3-none-any.whl 2>&1 | tail -3
python3 - <<'PY'
import time; t=time.time()
import torch, transformers, trl, peft, accelerate, datasets, sentence_transformers, prefect, mlflow, great_expectations, gguf, sklearn
print({m.__name__: m.__version__ for m in (torch, transformers, trl, peft, accelerate, datasets, sentence_transformers, prefect, mlflow, great_expectations)})
import cli.main, flows.study
from components.config import set_offline_env; set_offline_env()
from components.ops import tracking; tracking.configure()
import mlflow; mlflow.set_experiment("warmup")
from prefect import flow
@flow
def warm(): return 1
print("prefect flow ->", warm(), f"{time.time()-t:.1f}s")
PY
echo "B took $(( $(date +%s)-t0 )) s"
