//! Token-bucket rate limiting for device data paths (a NIC's receive and transmit directions):
//! one bucket for bytes, one for operations (frames), each with a size (the rate: tokens per
//! refill time), a refill time, and an optional one-time burst spent before the bucket, as
//! Firecracker's rate limiter has them.
//!
//! [`RateLimiter::consume`] either takes the tokens for one operation of N bytes from both
//! buckets, or takes nothing and says how long to wait. An operation larger than a bucket passes
//! once the bucket is full and empties it, so a bucket smaller than the largest frame throttles
//! instead of blocking forever. Time comes from the caller, so tests need no sleeping.

use std::time::{Duration, Instant};

/// One bucket's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketConfig {
    /// Tokens added per `refill_time` (bytes or operations); the bucket holds at most this many.
    pub size: u64,
    /// Tokens available once, before the bucket (0: none).
    pub one_time_burst: u64,
    /// Time to refill the whole bucket.
    pub refill_time: Duration,
}

/// A token bucket.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    config: BucketConfig,
    budget: u64,
    burst: u64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket; `None` when it would never refill (size or refill time 0): no limit.
    pub fn new(config: BucketConfig, now: Instant) -> Option<TokenBucket> {
        if config.size == 0 || config.refill_time.is_zero() {
            return None;
        }
        Some(TokenBucket {
            config,
            budget: config.size,
            burst: config.one_time_burst,
            last: now,
        })
    }

    /// The settings.
    pub fn config(&self) -> BucketConfig {
        self.config
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_nanos();
        let refill_ns = self.config.refill_time.as_nanos();
        let size = u128::from(self.config.size);
        let tokens = elapsed * size / refill_ns;
        if tokens == 0 {
            return;
        }
        // Advance by exactly the time those tokens took, so fractions are not lost.
        let used = tokens * refill_ns / size;
        self.last += Duration::from_nanos(u64::try_from(used).unwrap_or(u64::MAX));
        self.budget = (u128::from(self.budget) + tokens).min(size) as u64;
        if self.budget == self.config.size {
            // A full bucket does not store time: tokens beyond its size are lost.
            self.last = now;
        }
    }

    /// Tokens `n` would need from the bucket proper (after the burst), capped at its size.
    fn need(&self, n: u64) -> u64 {
        n.saturating_sub(self.burst).min(self.config.size)
    }

    /// Whether `n` tokens are available now.
    fn available(&mut self, n: u64, now: Instant) -> bool {
        self.refill(now);
        self.budget >= self.need(n)
    }

    /// Takes `n` tokens (the burst first); [`TokenBucket::available`] said yes.
    fn take(&mut self, n: u64) {
        let from_burst = n.min(self.burst);
        self.burst -= from_burst;
        let rest = (n - from_burst).min(self.config.size);
        self.budget = self.budget.saturating_sub(rest);
    }

    /// How long until `n` tokens are there.
    fn wait_for(&self, n: u64) -> Duration {
        let missing = self.need(n).saturating_sub(self.budget);
        let ns =
            u128::from(missing) * self.config.refill_time.as_nanos() / u128::from(self.config.size);
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX)).max(Duration::from_micros(100))
    }
}

/// A bytes bucket and an operations bucket for one direction.
#[derive(Debug, Clone, Default)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
}

impl RateLimiter {
    /// A limiter from optional bucket settings (none: unlimited).
    pub fn new(bandwidth: Option<BucketConfig>, ops: Option<BucketConfig>, now: Instant) -> Self {
        RateLimiter {
            bandwidth: bandwidth.and_then(|c| TokenBucket::new(c, now)),
            ops: ops.and_then(|c| TokenBucket::new(c, now)),
        }
    }

    /// Whether it limits anything.
    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }

    /// Takes the tokens for one operation of `bytes`, or nothing and the time to wait.
    pub fn consume(&mut self, bytes: u64, now: Instant) -> Result<(), Duration> {
        let bw_ok = self
            .bandwidth
            .as_mut()
            .is_none_or(|b| b.available(bytes, now));
        let ops_ok = self.ops.as_mut().is_none_or(|b| b.available(1, now));
        if bw_ok && ops_ok {
            if let Some(b) = self.bandwidth.as_mut() {
                b.take(bytes);
            }
            if let Some(b) = self.ops.as_mut() {
                b.take(1);
            }
            return Ok(());
        }
        let mut wait = Duration::ZERO;
        if let (false, Some(b)) = (bw_ok, &self.bandwidth) {
            wait = wait.max(b.wait_for(bytes));
        }
        if let (false, Some(b)) = (ops_ok, &self.ops) {
            wait = wait.max(b.wait_for(1));
        }
        Err(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(size: u64, burst: u64, ms: u64) -> BucketConfig {
        BucketConfig {
            size,
            one_time_burst: burst,
            refill_time: Duration::from_millis(ms),
        }
    }

    #[test]
    fn zero_size_or_time_means_unlimited() {
        let t = Instant::now();
        assert!(RateLimiter::new(Some(bucket(0, 0, 100)), Some(bucket(5, 0, 0)), t).is_unlimited());
        let mut r = RateLimiter::default();
        for _ in 0..1000 {
            assert_eq!(r.consume(1 << 20, t), Ok(()));
        }
    }

    #[test]
    fn bandwidth_holds_its_rate_over_time() {
        // 10 MB/s: 1 MB per 100 ms.
        let t0 = Instant::now();
        let mut r = RateLimiter::new(Some(bucket(1_000_000, 0, 100)), None, t0);
        let mut now = t0;
        let mut sent = 0u64;
        let end = t0 + Duration::from_secs(10);
        while now < end {
            match r.consume(1500, now) {
                Ok(()) => sent += 1500,
                Err(wait) => now += wait,
            }
        }
        // 10 s at 10 MB/s, plus the initially full bucket.
        let expect = 10 * 10_000_000 + 1_000_000;
        assert!(
            sent.abs_diff(expect) < expect / 100,
            "sent {sent}, expected ~{expect}"
        );
    }

    #[test]
    fn ops_bucket_and_the_one_time_burst() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(None, Some(bucket(10, 5, 1000)), t0);
        for i in 0..15 {
            assert_eq!(r.consume(64, t0), Ok(()), "op {i}");
        }
        let wait = r.consume(64, t0).unwrap_err();
        assert!(
            wait >= Duration::from_millis(99) && wait <= Duration::from_millis(101),
            "{wait:?}"
        );
        assert_eq!(r.consume(64, t0 + wait), Ok(()));
    }

    #[test]
    fn a_refused_operation_takes_nothing_from_either_bucket() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(Some(bucket(1000, 0, 1000)), Some(bucket(1, 0, 1000)), t0);
        assert_eq!(r.consume(100, t0), Ok(()));
        // The ops bucket is empty: the bytes must not be taken either.
        assert!(r.consume(100, t0).is_err());
        let later = t0 + Duration::from_secs(1);
        assert_eq!(
            r.consume(900, later),
            Ok(()),
            "bytes were taken by the refused op"
        );
    }

    #[test]
    fn an_operation_larger_than_the_bucket_passes_when_it_is_full() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(Some(bucket(1000, 0, 100)), None, t0);
        assert_eq!(r.consume(65_000, t0), Ok(()));
        let wait = r.consume(65_000, t0).unwrap_err();
        assert_eq!(r.consume(65_000, t0 + wait), Ok(()));
    }
}
