"""Package data: the BPF C source of the probe (tcpidle.bpf.c), loaded by tcpidle.probe."""
