/* iobench: a tiny O_DIRECT block device benchmark for the test guest (built static by build.sh and
 * installed as /bin/iobench in the default guest's initramfs).
 *
 *   iobench DEV MODE BS SECONDS
 *
 * MODE: seqread | seqwrite | randread | randwrite. DEV is opened with O_DIRECT (so neither the guest's
 * page cache nor its readahead is measured), one request at a time (queue depth 1) with a
 * posix_memalign'd buffer of BS bytes. The run lasts SECONDS: sequential modes walk the device from
 * offset 0 in BS steps and wrap around at its end; random modes pick BS-aligned offsets over the whole
 * device (BLKGETSIZE64, or st_size for a regular file) from a fixed-seed xorshift64, so every run
 * touches the same offsets in the same order. Writes use a non-zero pattern (the offset, xor'ed with
 * a constant, stamped in each 512-byte sector) and end with one fdatasync, counted in the time.
 *
 * Output, one line on stdout (MB = 10^6 bytes):
 *   IOBENCH mode=randread bs=4096 ops=N bytes=B secs=S iops=X mbps=Y lat_us=L size=D
 * Errors: a line "iobench: ..." on stderr and exit status 1 (2 for bad usage).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint64_t xorshift64(uint64_t *s) {
  uint64_t x = *s;
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  return *s = x;
}

static void usage(void) {
  fprintf(stderr, "usage: iobench DEV seqread|seqwrite|randread|randwrite BS SECONDS\n");
  exit(2);
}

int main(int argc, char **argv) {
  if (argc != 5) usage();
  const char *dev = argv[1], *mode = argv[2];
  int seq, wr;
  if (!strcmp(mode, "seqread")) seq = 1, wr = 0;
  else if (!strcmp(mode, "seqwrite")) seq = 1, wr = 1;
  else if (!strcmp(mode, "randread")) seq = 0, wr = 0;
  else if (!strcmp(mode, "randwrite")) seq = 0, wr = 1;
  else usage();
  char *end;
  unsigned long long bs = strtoull(argv[3], &end, 0);
  if (*end == 'k' || *end == 'K') bs <<= 10, end++;
  else if (*end == 'm' || *end == 'M') bs <<= 20, end++;
  if (*end || bs == 0 || bs % 512 || bs > (256ULL << 20)) {
    fprintf(stderr, "iobench: bad block size %s (a multiple of 512, at most 256M)\n", argv[3]);
    return 2;
  }
  double secs = strtod(argv[4], &end);
  if (*end || !(secs > 0)) {
    fprintf(stderr, "iobench: bad duration %s\n", argv[4]);
    return 2;
  }

  int fd = open(dev, (wr ? O_RDWR : O_RDONLY) | O_DIRECT);
  if (fd < 0) {
    fprintf(stderr, "iobench: open %s with O_DIRECT: %s\n", dev, strerror(errno));
    return 1;
  }
  uint64_t size = 0;
  struct stat st;
  if (fstat(fd, &st) == 0 && S_ISBLK(st.st_mode)) {
    if (ioctl(fd, BLKGETSIZE64, &size) != 0) {
      fprintf(stderr, "iobench: BLKGETSIZE64 on %s: %s\n", dev, strerror(errno));
      return 1;
    }
  } else {
    size = (uint64_t)st.st_size;
  }
  uint64_t nblocks = size / bs;
  if (nblocks == 0) {
    fprintf(stderr, "iobench: %s (%llu bytes) is smaller than one block of %llu\n", dev,
            (unsigned long long)size, bs);
    return 1;
  }

  unsigned char *buf;
  int rc = posix_memalign((void **)&buf, 4096, bs);
  if (rc) {
    fprintf(stderr, "iobench: posix_memalign(%llu): %s\n", bs, strerror(rc));
    return 1;
  }
  for (uint64_t i = 0; i < bs; i++) buf[i] = (unsigned char)(0x5a ^ (i * 131) ^ (i >> 9)) | 1;

  uint64_t seed = 0x9e3779b97f4a7c15ULL, ops = 0, blk = 0;
  double t0 = now(), t = t0, stop = t0 + secs;
  while (t < stop) {
    blk = seq ? ops % nblocks : xorshift64(&seed) % nblocks;
    off_t off = (off_t)(blk * bs);
    if (wr) {
      uint64_t tag = (uint64_t)off ^ 0xa5a5a5a5a5a5a5a5ULL;  /* never all zero */
      for (uint64_t s = 0; s < bs; s += 512) memcpy(buf + s, &tag, sizeof tag);
    }
    ssize_t n = wr ? pwrite(fd, buf, bs, off) : pread(fd, buf, bs, off);
    if (n != (ssize_t)bs) {
      fprintf(stderr, "iobench: %s at offset %lld: %s\n", wr ? "pwrite" : "pread", (long long)off,
              n < 0 ? strerror(errno) : "short transfer");
      return 1;
    }
    ops++;
    t = now();
  }
  if (wr && fdatasync(fd) != 0) {
    fprintf(stderr, "iobench: fdatasync: %s\n", strerror(errno));
    return 1;
  }
  double el = now() - t0;
  unsigned long long bytes = ops * bs;
  printf("IOBENCH mode=%s bs=%llu ops=%llu bytes=%llu secs=%.3f iops=%.1f mbps=%.2f lat_us=%.1f "
         "size=%llu\n",
         mode, bs, (unsigned long long)ops, bytes, el, ops / el, bytes / el / 1e6, el * 1e6 / ops,
         (unsigned long long)size);
  close(fd);
  return 0;
}
