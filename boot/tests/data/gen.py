#!/usr/bin/env python3
"""Generates the bzImage-payload test vectors of boot/src/decompress (run once, from this folder).

vmlinux.elf is a tiny ELF64 x86-64 executable (one PT_LOAD at 16 MiB, entry 0x1000000) whose
body holds x86 call/jmp opcodes so the xz BCJ filter has work to do. Each payload is compressed
the way arch/x86/boot/compressed/Makefile does it: gzip as is; xz (scripts/xz_wrap.sh options),
zstd and lz4 legacy with the uncompressed size appended as le32.
"""
import struct, subprocess

PADDR = 0x1000000
body = bytearray()
for i in range(6000):
    body += bytes([0xe8]) + struct.pack('<i', (i * 37) % 4096 - 2048)  # call rel32
    body += bytes([0x48, 0x89, 0xc7, 0x90, i & 0xff])
body = bytes(body)
ehdr = b'\x7fELF' + bytes([2, 1, 1, 0]) + bytes(8)
ehdr += struct.pack('<HHIQQQIHHHHHH', 2, 62, 1, PADDR, 64, 0, 0, 64, 56, 1, 0, 0, 0)
phdr = struct.pack('<IIQQQQQQ', 1, 5, 0x1000, 0xffffffff80000000 + PADDR, PADDR,
                   len(body), len(body) + 0x2000, 0x1000)
elf = (ehdr + phdr).ljust(0x1000, b'\0') + body
open('vmlinux.elf', 'wb').write(elf)
size = struct.pack('<I', len(elf))

def run(cmd):
    return subprocess.run(cmd, input=elf, stdout=subprocess.PIPE, check=True).stdout

open('vmlinux.gz', 'wb').write(run(['gzip', '-n', '-9']))
open('vmlinux.xz', 'wb').write(run(['xz', '--format=xz', '--check=crc32', '--x86',
                                    '--lzma2=dict=1MiB', '-c']) + size)
open('vmlinux.zst', 'wb').write(run(['zstd', '-19', '-c']) + size)
open('vmlinux.lz4', 'wb').write(run(['lz4', '-l', '-9', '-c']) + size)
