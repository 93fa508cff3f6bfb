export OUT
bash scripts/gpu_check.sh tests > $OUT/check.log 2>&1; tail -1 $OUT/check.log; rm -f $OUT/build.log $OUT/pytest.log
python3 bench/bench.py --out $OUT --repeats 30 --warmup 5 > $OUT/bench.log 2>&1; tail -8 $OUT/bench.log
mkdir -p /tmp/b2; python3 bench/bench.py --out /tmp/b2 --repeats 30 --warmup 5 > /tmp/b2/bench.log 2>&1; cp /tmp/b2/bench.csv $OUT/bench2.csv; tail -8 /tmp/b2/bench.log
python3 bench/profile_train.py --out $OUT > /dev/null 2>&1
python3 bench/profile_host.py --out $OUT > /dev/null 2>&1
grep -E -- "- q4 train|- fp16 train|- q4 eval|- cudnn" $OUT/profile_host.md
rm -f $OUT/bench.log
ls $OUT
