//! The retry mechanism: given that a record should be retried, when (or whether) to try again.
//!
//! Classification (is this retryable?) lives in [`crate::outcome`]; this module only applies the
//! route's bounds: `max_attempts`, exponential backoff with jitter, `Retry-After` capped at
//! `backoff.max`, and `max_record_age` counted from the record's first attempt.

use std::time::Duration;

use crate::config::{Jitter, Retry};

/// The next step for a record that asked to be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Wait this long, then call again.
    After(Duration),
    /// `max_attempts` attempts were made.
    Exhausted,
    /// The next attempt would start past `max_record_age`.
    TooOld,
}

/// Decides the next step after `attempts` failed attempts, `elapsed` after the first one.
/// `random` is uniform in `[0, 1)` and drives the jitter.
pub fn next(
    policy: &Retry,
    attempts: u32,
    elapsed: Duration,
    retry_after: Option<Duration>,
    random: f64,
) -> Next {
    if attempts >= policy.max_attempts {
        return Next::Exhausted;
    }
    let b = &policy.backoff;
    let delay = match retry_after {
        Some(asked) => asked.min(b.max.0),
        None => {
            let exp = b.multiplier.powi(attempts.saturating_sub(1).min(1000) as i32);
            let full = b.initial.0.mul_f64(exp.min(1e9)).min(b.max.0);
            match b.jitter {
                Jitter::Full => full.mul_f64(random),
                Jitter::Equal => full / 2 + (full / 2).mul_f64(random),
                Jitter::None => full,
            }
        }
    };
    if elapsed + delay > policy.max_record_age.0 {
        return Next::TooOld;
    }
    Next::After(delay)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Backoff, Dur};

    fn policy(jitter: Jitter) -> Retry {
        Retry {
            max_attempts: 5,
            backoff: Backoff {
                initial: Dur(Duration::from_millis(100)),
                max: Dur(Duration::from_secs(1)),
                multiplier: 2.0,
                jitter,
            },
            max_record_age: Dur(Duration::from_secs(10)),
            topics: Vec::new(),
        }
    }

    #[test]
    fn table() {
        let ms = Duration::from_millis;
        let none = policy(Jitter::None);
        let cases = [
            // (attempts made, elapsed, Retry-After, random, expected)
            (1, ms(0), None, 0.5, Next::After(ms(100))),
            (2, ms(0), None, 0.5, Next::After(ms(200))),
            (3, ms(0), None, 0.5, Next::After(ms(400))),
            (4, ms(0), None, 0.5, Next::After(ms(800))),
            (5, ms(0), None, 0.5, Next::Exhausted),
            (1, ms(0), Some(ms(300)), 0.5, Next::After(ms(300))),
            (1, ms(0), Some(ms(5000)), 0.5, Next::After(ms(1000))),
            (1, ms(9950), None, 0.5, Next::TooOld),
            (1, ms(9850), Some(ms(100)), 0.5, Next::After(ms(100))),
        ];
        for (attempts, elapsed, after, random, want) in cases {
            assert_eq!(
                next(&none, attempts, elapsed, after, random),
                want,
                "{attempts} {elapsed:?} {after:?}"
            );
        }
    }

    #[test]
    fn backoff_is_capped_at_max() {
        let mut p = policy(Jitter::None);
        p.max_attempts = 100;
        p.max_record_age = Dur(Duration::from_secs(3600));
        assert_eq!(
            next(&p, 60, Duration::ZERO, None, 0.0),
            Next::After(Duration::from_secs(1))
        );
    }

    #[test]
    fn jitter_stays_within_its_range() {
        let full = policy(Jitter::Full);
        let equal = policy(Jitter::Equal);
        assert_eq!(
            next(&full, 3, Duration::ZERO, None, 0.0),
            Next::After(Duration::ZERO)
        );
        assert_eq!(
            next(&full, 3, Duration::ZERO, None, 0.5),
            Next::After(Duration::from_millis(200))
        );
        assert_eq!(
            next(&equal, 3, Duration::ZERO, None, 0.0),
            Next::After(Duration::from_millis(200))
        );
        assert_eq!(
            next(&equal, 3, Duration::ZERO, None, 0.99),
            Next::After(Duration::from_millis(398))
        );
    }
}
