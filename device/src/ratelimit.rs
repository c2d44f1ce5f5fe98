// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Rate-limited logging for what a guest can trigger (a bad ring index, an unusable buffer,
//! a malformed chain, a driver mistake the audit sees): each call site logs at most
//! [`BURST`] lines per [`WINDOW`], then says how many it suppressed. A guest that repeats a
//! mistake in a loop costs a few lines a minute, not the host's disk.
//!
//! ```ignore
//! warn_limited!("svmgpu{}: a buffer was returned unused", index);
//! ```

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Lines a call site may log per window.
pub const BURST: u32 = 10;
/// The window.
pub const WINDOW: Duration = Duration::from_secs(10);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// The state of one call site.
#[derive(Debug)]
pub struct RateLimit {
    /// Start of the current window, in milliseconds since [`epoch`] (+1, so 0 is "none").
    window: AtomicU64,
    /// Lines allowed in the current window.
    lines: AtomicU32,
    /// Lines suppressed since the last one logged.
    suppressed: AtomicU64,
}

impl RateLimit {
    /// A call site that has logged nothing.
    pub const fn new() -> Self {
        Self {
            window: AtomicU64::new(0),
            lines: AtomicU32::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` if a line may be logged now, `n` being the lines suppressed since the
    /// last one logged; `None` if this one is suppressed.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(epoch().elapsed())
    }

    fn allow_at(&self, now: Duration) -> Option<u64> {
        let now_ms = u64::try_from(now.as_millis()).unwrap_or(u64::MAX - 1) + 1;
        let start = self.window.load(Ordering::Acquire);
        let window_ms = u64::try_from(WINDOW.as_millis()).unwrap_or(u64::MAX);
        if start == 0 || now_ms.saturating_sub(start) >= window_ms {
            // A new window (several threads may race here: a few extra lines at most).
            self.window.store(now_ms, Ordering::Release);
            self.lines.store(0, Ordering::Release);
        }
        if self.lines.fetch_add(1, Ordering::AcqRel) < BURST {
            Some(self.suppressed.swap(0, Ordering::AcqRel))
        } else {
            self.suppressed.fetch_add(1, Ordering::AcqRel);
            None
        }
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

/// `log::warn!`, at most [`BURST`] lines per [`WINDOW`] from this call site.
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new();
        if let Some(n) = LIMIT.allow() {
            if n > 0 {
                log::warn!("{} ({n} similar lines suppressed)", format_args!($($arg)+));
            } else {
                log::warn!($($arg)+);
            }
        }
    }};
}

/// `log::error!`, at most [`BURST`] lines per [`WINDOW`] from this call site.
#[macro_export]
macro_rules! error_limited {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new();
        if let Some(n) = LIMIT.allow() {
            if n > 0 {
                log::error!("{} ({n} similar lines suppressed)", format_args!($($arg)+));
            } else {
                log::error!($($arg)+);
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_counts_what_it_suppressed() {
        let l = RateLimit::new();
        let t0 = Duration::from_secs(100);
        for _ in 0..BURST {
            assert_eq!(l.allow_at(t0), Some(0));
        }
        for _ in 0..1000 {
            assert_eq!(l.allow_at(t0 + Duration::from_secs(1)), None);
        }
        // The next window says how many were suppressed, once.
        assert_eq!(l.allow_at(t0 + WINDOW), Some(1000));
        assert_eq!(l.allow_at(t0 + WINDOW), Some(0));
    }

    #[test]
    fn the_macros_log_at_most_a_burst() {
        // Exercises the macro expansion (the logger is not installed: nothing is printed).
        for i in 0..100 {
            warn_limited!("line {i}");
            error_limited!("line {}", i);
        }
    }
}
