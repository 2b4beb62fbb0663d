#!/bin/sh
# What one uprobe hit costs on this kernel, by the kind of instruction probed: the kernel
# emulates a few (push, jumps, nops) and single-steps the others out of line. No BPF program
# is attached (tracefs uprobe events), so this is the trap alone. Run as root:
#     sh xtask/bench/uprobe_trap.sh
# Prints ns per call of three tiny functions without, then with, a uprobe on an instruction
# of each kind. BENCHMARKS.md and README ("Which vantage to prefer") quote its figures.
set -eu
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cat > "$dir/t.c" <<'C'
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
/* Each begins with the instruction the uprobe lands on (see the offsets below). */
__attribute__((noinline, naked)) long f_step(long x) { __asm__("sub $0x18,%rsp\n add $0x18,%rsp\n lea 1(%rdi),%rax\n ret"); }
__attribute__((noinline, naked)) long f_push(long x) { __asm__("push %rbx\n pop %rbx\n lea 2(%rdi),%rax\n ret"); }
__attribute__((noinline, naked)) long f_nop(long x) { __asm__(".byte 0x0f,0x1f,0x44,0x00,0x00\n lea 3(%rdi),%rax\n ret"); }
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
int main(int argc, char **argv) {
    long n = atol(argv[1]), s = 0;
    long (*f[3])(long) = {f_step, f_push, f_nop};
    const char *name[3] = {"sub $0x18,%rsp (single-stepped)", "push %rbx (emulated)", "nop5 (emulated)"};
    for (int k = 0; k < 3; k++) {
        double t0 = now();
        for (long i = 0; i < n; i++) s += f[k](i);
        printf("  %-34s %9.0f ns per call\n", name[k], (now() - t0) / n * 1e9);
    }
    return (int)(s & 1) * 0;
}
C
cc -O2 -o "$dir/t" "$dir/t.c"
T=/sys/kernel/tracing
[ -e "$T/uprobe_events" ] || T=/sys/kernel/debug/tracing
off() { nm "$dir/t" | awk -v f="$1" '$3 == f { print "0x" $1 }'; }
echo "without uprobes:"
"$dir/t" 2000000
for f in f_step f_push f_nop; do
    echo "p:vigie_trap/$f $dir/t:$(off $f)" >> "$T/uprobe_events"
done
echo 1 > "$T/events/vigie_trap/enable"
echo "with a uprobe on each function's first instruction:"
"$dir/t" 200000
echo 0 > "$T/events/vigie_trap/enable"
for f in f_step f_push f_nop; do echo "-:vigie_trap/$f" >> "$T/uprobe_events"; done
echo > "$T/trace"
