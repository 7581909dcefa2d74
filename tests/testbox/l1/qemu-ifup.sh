#!/bin/sh
# QEMU-style ifup script for the network scenarios, run by our vmm with the tap's name: bring the
# tap up and put it on a bridge the scenario made: br1 for taps whose name ends in "b1", br0 else.
case "$1" in *b1) br=br1 ;; *) br=br0 ;; esac
ip link set "$1" up && brctl addif "$br" "$1"
