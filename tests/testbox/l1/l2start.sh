#!/bin/sh
# Runs inside L1: start an L2 VMM in the background, detached from the console.
#   l2start.sh DIR MODE CMD [ARG]...
# DIR gets: in (FIFO: the VMM's stdin, opened read-write so the VMM never sees EOF; write lines to it
# to type on the guest console), out (the VMM's stdout), err (its stderr), pid (the VMM's PID, written
# by the process itself before it execs the VMM), rc (its exit status once it has ended: 128+N when
# killed by signal N).
# MODE raw: stdout goes to DIR/out as is. MODE ts: stdout goes through busybox `ts '%.s'`, which
# prefixes every line with the epoch time (µs) at which it arrived; a line "VMM-EXEC-START" is written
# to the same stream just before exec, so (marker time - start time) is measured with one clock and
# no process start in between (the boot benchmark uses this).
d=$1; mode=$2; shift 2
rm -rf "$d"; mkdir -p "$d"; mkfifo "$d/in"
if [ "$mode" = ts ]; then
  mkfifo "$d/pipe"
  ts '%.s' < "$d/pipe" > "$d/out" 2>/dev/null &
  exec 1>"$d/pipe"
else
  exec 1>"$d/out"
fi
exec 2>"$d/err"
sh -c 'echo $$ > "$0/pid"; echo VMM-EXEC-START; exec "$@"' "$d" "$@" <> "$d/in"
echo $? > "$d/rc.tmp"; mv "$d/rc.tmp" "$d/rc"
