#!/bin/bash
# How the off/ and on/ pages' runs were made on a lent H200 (run from the repository root, .whl carried: see
# benchmarks/gpu_lease.sh); each page was then written from the fetched report/scores.csv by the command in its header.
# tuning seeds: Myo fitted on the GPU, M^ref without and with anatomy.yield_to [Cor] (repair-only on the same fits)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
one() {
  f=$1; O=/tmp/m/$f
  python3 -m benchmarks.robustness --out $O/off --split tuning --cases 3 --families $f --device cuda \
    --overrides '{stage1.classes: [Myo]}' > /tmp/m/$f.off.log 2>&1 || { echo "$f off failed"; tail -5 /tmp/m/$f.off.log; return; }
  mkdir -p $O/on; cp -r $O/off/runs $O/off/data $O/off/params $O/on/
  sed -i "s#$O/off/#$O/on/#g" $O/on/params/*.yaml $O/on/runs/*/params.yaml
  for r in $O/on/runs/*; do rm -rf $r/stage1/parts $r/stage1/Myo/masks $r/stage1/Myo/prob $r/stage1/Myo/parts $r/stage1/Myo/scores.csv $r/stage2 $r/report; done
  python3 -m benchmarks.robustness --out $O/on --split tuning --cases 3 --families $f --device cuda \
    --overrides '{stage1.classes: [Myo], stage1.overrides.Myo.anatomy.yield_to: [Cor]}' > /tmp/m/$f.on.log 2>&1 || { echo "$f on failed"; tail -5 /tmp/m/$f.on.log; }
  echo "$f done $SECONDS s"
}
mkdir -p /tmp/m
for f in thick_cor shapes dim_ct thin_cor; do one $f & done
wait
cd /tmp/m && tar -czf $OUT/myo_tuning.tgz */off/robustness.csv */on/robustness.csv */off/runs/*/report/scores.csv */on/runs/*/report/scores.csv *.log 2>/dev/null
ls -la $OUT; grep -h "Myo" */off/robustness.csv */on/robustness.csv | grep -E "stage1|stage2|noisy" 
