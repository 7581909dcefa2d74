#!/bin/sh
# Runs inside L1: start an L2 VMM in the background, detached from the console.
#   l2start.sh DIR MODE CMD [ARG]...
# DIR gets: in (FIFO: the VMM's stdin, opened read-write so the VMM never sees EOF; write lines to it
# to type on the guest console), out (the VMM's stdout, written as it comes), err (its stderr), pid
# (the VMM's PID, written by the process itself just before it execs the VMM), rc (its exit status
# once it has ended, 128+N when killed by signal N; every file here is complete once rc exists).
# A line "VMM-EXEC-START" is written to stdout just before the exec.
# MODE ts: stdout also goes through busybox `ts '%.s'` into DIR/ts.out, every line prefixed with the
# epoch time (µs) at which it arrived, so (marker time - VMM-EXEC-START time) is measured by one
# process with one clock (the boot benchmark). `ts` block-buffers its output: ts.out is complete only
# once rc exists; `out` (through tee, unbuffered) is the live copy.
d=$1; mode=$2; shift 2
rm -rf "$d"; mkdir -p "$d"; mkfifo "$d/in"
if [ "$mode" = ts ]; then
  mkfifo "$d/pipe"
  tee "$d/out" < "$d/pipe" 2>/dev/null | ts '%.s' > "$d/ts.out" 2>/dev/null &
  exec 1>"$d/pipe"
else
  exec 1>"$d/out"
fi
exec 2>"$d/err"
sh -c 'echo $$ > "$0/pid"; echo VMM-EXEC-START; exec "$@"' "$d" "$@" <> "$d/in"
rc=$?
exec 1>/dev/null 2>&1   # our end of the pipe: tee and ts see EOF and finish
wait
echo $rc > "$d/rc.tmp"; mv "$d/rc.tmp" "$d/rc"
