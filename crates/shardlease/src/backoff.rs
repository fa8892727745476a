//! The one retry schedule of the library (and of the worker): capped exponential backoff
//! with jitter.

use std::time::Duration;

use backon::ExponentialBuilder;

/// Exponential backoff from `min` up to `max` between attempts, with no limit on the number
/// of attempts, and jitter drawn from a randomly seeded generator (backon's `std` feature:
/// without it every process draws the same delays, and a group that lost its server retries
/// in lockstep). Limit the attempts with
/// [`with_max_times`](ExponentialBuilder::with_max_times).
///
/// ```
/// use std::time::Duration;
/// use backon::BackoffBuilder;
///
/// let mut delays = shardlease::backoff::jittered(Duration::from_millis(50), Duration::from_secs(5)).build();
/// assert!(delays.next().unwrap() <= Duration::from_millis(100)); // 50 ms plus at most 100% jitter
/// ```
#[must_use]
pub fn jittered(min: Duration, max: Duration) -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
}
