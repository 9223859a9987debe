"""Quality and ablation experiments: restoration quality, the ablation rows, the NR metrics' audit
and the oracle factorial (QUALITY.md holds what they measured). Not installed, like benchmarks/
for the speed benchmarks."""
