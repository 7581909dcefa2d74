#!/bin/sh
# QEMU-style downscript: take the tap off its bridge (the vmm runs it before closing the tap).
case "$1" in *b1) br=br1 ;; *) br=br0 ;; esac
brctl delif "$br" "$1"
