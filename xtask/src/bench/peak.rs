//! Peak zero-loss rate, after RFC 2544 §26.1 (throughput): the highest paced offered rate a
//! path forwards with at most [`MAX_LOSS`] lost, found by a bounded search of short paced
//! trials (the socket generator's paced mode; the live-frames generator injects bursts and
//! cannot pace).
//!
//! The search is a bisection in log space between `upper` (a little above the path's overload
//! goodput, measured just before) and `upper / 32`, with a fixed number of trials: the first
//! trial offers `upper` itself, each later one the geometric middle of what is still open, so
//! `steps` trials pin the rate to within a factor of 32^(1 / 2^(steps - 1)) (4 steps: ±12 %,
//! 6 steps: ±3 %). Two things end it early: the first trial passing (the peak is at least
//! `upper`), and a passing trial the generator could not offer in full (the peak is at least
//! what it did offer; more would measure the generator). Both make the result a lower bound.

use std::time::Duration;

use super::runner::Measurement;

/// RFC 2544 asks for zero loss; 0.1 % allows for the odd datagram lost at a trial's edges.
pub const MAX_LOSS: f64 = 0.001;
/// A trial whose achieved offered rate is below this share of its target was generator-limited.
const GENERATOR_SHORT: f64 = 0.97;
/// How far below `upper` the search looks.
const RANGE: f64 = 32.0;

/// The shape of one search.
#[derive(Clone, Copy, Debug)]
pub struct SearchPlan {
    pub steps: usize,
    pub trial: Duration,
    pub settle: Duration,
}

#[derive(Clone, Debug)]
pub struct Trial {
    pub target_pps: f64,
    pub offered_pps: f64,
    pub delivered_pps: f64,
    pub loss: f64,
    pub passed: bool,
    pub generator_short: bool,
}

#[derive(Clone, Debug, Default)]
pub struct Peak {
    /// The highest offered rate (achieved, not targeted) that passed; 0 if none did.
    pub rate_pps: f64,
    /// The search's top: the first trial's target.
    pub upper_pps: f64,
    /// The path may carry more: the first trial passed, or the generator ran short.
    pub lower_bound: bool,
    /// The generator could not offer a passing trial's target.
    pub generator_limited: bool,
    pub trials: Vec<Trial>,
}

/// Runs the search; `trial(rate)` floods paced at `rate` pps for the plan's trial time.
pub fn search(
    plan: &SearchPlan,
    upper: f64,
    mut trial: impl FnMut(f64) -> anyhow::Result<Measurement>,
) -> anyhow::Result<Peak> {
    let mut peak = Peak {
        upper_pps: upper,
        ..Peak::default()
    };
    if upper <= 0.0 || plan.steps == 0 {
        return Ok(peak);
    }
    let (mut lo, mut hi) = (upper / RANGE, upper);
    for step in 0..plan.steps {
        let target = if step == 0 { upper } else { (lo * hi).sqrt() };
        let m = trial(target)?;
        let loss = m.sent().saturating_sub(m.delivered()) as f64 / m.sent().max(1) as f64;
        let t = Trial {
            target_pps: target,
            offered_pps: m.offered_pps(),
            delivered_pps: m.pps(),
            loss,
            passed: m.sent() > 0 && loss <= MAX_LOSS,
            generator_short: m.offered_pps() < GENERATOR_SHORT * target,
        };
        let (passed, short) = (t.passed, t.generator_short);
        if passed {
            peak.rate_pps = peak.rate_pps.max(t.offered_pps);
        }
        peak.trials.push(t);
        if passed && (step == 0 || short) {
            peak.lower_bound = true;
            peak.generator_limited = short;
            break;
        }
        if passed {
            lo = target;
        } else {
            hi = target;
        }
    }
    Ok(peak)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A path that forwards up to `capacity` pps without loss, behind a generator that can
    /// offer up to `reach` pps.
    fn fake(capacity: f64, reach: f64) -> impl FnMut(f64) -> anyhow::Result<Measurement> {
        move |rate| {
            let offered = rate.min(reach);
            let delivered = offered.min(capacity);
            Ok(Measurement {
                elapsed_s: 1.0,
                sent_c2p: offered as u64,
                delivered_c2p: delivered as u64,
                ..Measurement::default()
            })
        }
    }

    fn plan(steps: usize) -> SearchPlan {
        SearchPlan {
            steps,
            trial: Duration::from_millis(1),
            settle: Duration::ZERO,
        }
    }

    #[test]
    fn bisection_converges_below_capacity() {
        let peak = search(&plan(6), 1e6, fake(300e3, 1e9)).unwrap();
        assert_eq!(peak.trials.len(), 6);
        assert!(!peak.lower_bound);
        // Within the 6-step resolution (32^(1/32) ≈ 1.11) below the capacity.
        assert!(
            peak.rate_pps <= 300e3 && peak.rate_pps > 300e3 / 1.12,
            "{peak:?}"
        );
    }

    #[test]
    fn upper_bound_passing_ends_the_search() {
        let peak = search(&plan(6), 100e3, fake(300e3, 1e9)).unwrap();
        assert_eq!(peak.trials.len(), 1);
        assert!(peak.lower_bound && !peak.generator_limited);
        assert_eq!(peak.rate_pps, 100e3);
    }

    #[test]
    fn generator_short_is_a_lower_bound() {
        let peak = search(&plan(6), 2e6, fake(1.5e6, 800e3)).unwrap();
        assert!(peak.lower_bound && peak.generator_limited);
        assert_eq!(peak.rate_pps, 800e3);
    }

    #[test]
    fn nothing_passing_is_zero() {
        let peak = search(&plan(3), 1e6, fake(0.0, 1e9)).unwrap();
        assert_eq!(peak.rate_pps, 0.0);
        assert_eq!(peak.trials.len(), 3);
    }
}
