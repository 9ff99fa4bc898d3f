//! How a target is judged: on pooled figures, with a bootstrap confidence interval over
//! rounds, and called met or missed only when the whole interval is on one side of the
//! limit ("inconclusive" otherwise).
//!
//! Why rounds are the unit: the exchanges of one round share its scheduler placement and the
//! host's state at that moment, so they are not independent; resampling single exchanges
//! would give an interval far too narrow, and a verdict a second run does not repeat. Each
//! bootstrap replicate draws the rounds with replacement, the *same* draw for both modes of a
//! ratio (round `r` of every mode ran side by side), pools the drawn rounds' samples and
//! takes the ratio of the two pooled figures. The interval is the 2.5th to 97.5th
//! percentile of the replicates' ratios; the point estimate is the ratio of the figures of
//! all rounds pooled.

use std::fmt;

/// Bootstrap replicates per interval: enough for stable 2.5/97.5 percentiles.
const REPLICATES: usize = 2_000;
/// A fixed seed: the same run's data always gives the same interval.
const SEED: u64 = 0x5eed_b007_57a9_0001;

/// A pooled ratio and its 95 % bootstrap interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ratio {
    pub point: f64,
    pub low: f64,
    pub high: f64,
}

impl fmt::Display for Ratio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.2}× [{:.2}, {:.2}]", self.point, self.low, self.high)
    }
}

/// Which side of the limit is good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    AtMost,
    AtLeast,
    /// Strictly below (a "faster than" target).
    Below,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Met,
    Missed,
    Inconclusive,
}

impl Verdict {
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Met => "met",
            Verdict::Missed => "**missed**",
            Verdict::Inconclusive => "inconclusive",
        }
    }
}

/// Met when the whole interval is on the good side of `limit`, missed when it is all on the
/// bad side, inconclusive when it straddles the limit.
pub fn judge(r: Ratio, bound: Bound, limit: f64) -> Verdict {
    let (good, bad) = match bound {
        Bound::AtMost => (r.high <= limit, r.low > limit),
        Bound::AtLeast => (r.low >= limit, r.high < limit),
        Bound::Below => (r.high < limit, r.low >= limit),
    };
    if !(r.low.is_finite() && r.high.is_finite()) {
        Verdict::Inconclusive
    } else if good {
        Verdict::Met
    } else if bad {
        Verdict::Missed
    } else {
        Verdict::Inconclusive
    }
}

/// Percentile `p` of `a`'s samples over `b`'s, all rounds pooled, with its interval. Each is
/// one sorted list of samples (ns) per round, rounds in the order they ran; both have the same
/// number of rounds.
pub fn percentile_ratio(a: &[Vec<u32>], b: &[Vec<u32>], p: f64) -> Ratio {
    debug_assert!(
        a.iter().chain(b).all(|r| r.is_sorted()),
        "rounds must be sorted"
    );
    bootstrap(a.len().min(b.len()), |w| {
        pooled_percentile(a, w, p) / pooled_percentile(b, w, p)
    })
}

/// `a`'s pooled rate over `b`'s, each round given as (count, seconds): the rate of all the
/// drawn rounds together is their total count over their total time.
pub fn rate_ratio(a: &[(f64, f64)], b: &[(f64, f64)]) -> Ratio {
    let pooled = |rounds: &[(f64, f64)], w: &[u32]| {
        let (n, s) = rounds
            .iter()
            .zip(w)
            .fold((0.0, 0.0), |(n, s), ((c, t), &k)| {
                (n + c * f64::from(k), s + t * f64::from(k))
            });
        n / s
    };
    bootstrap(a.len().min(b.len()), |w| pooled(a, w) / pooled(b, w))
}

/// The statistic with every round once (the point) and over [`REPLICATES`] draws of the
/// rounds with replacement (`weights[r]` = how often round `r` was drawn).
fn bootstrap(rounds: usize, stat: impl Fn(&[u32]) -> f64) -> Ratio {
    if rounds == 0 {
        return Ratio {
            point: f64::NAN,
            low: f64::NAN,
            high: f64::NAN,
        };
    }
    let point = stat(&vec![1; rounds]);
    let mut rng = SplitMix(SEED);
    let mut weights = vec![0u32; rounds];
    let mut replicates: Vec<f64> = (0..REPLICATES)
        .map(|_| {
            weights.iter_mut().for_each(|w| *w = 0);
            for _ in 0..rounds {
                weights[rng.below(rounds)] += 1;
            }
            stat(&weights)
        })
        .filter(|r| r.is_finite())
        .collect();
    if replicates.is_empty() {
        return Ratio {
            point,
            low: f64::NAN,
            high: f64::NAN,
        };
    }
    replicates.sort_by(f64::total_cmp);
    let at =
        |q: f64| replicates[((q * replicates.len() as f64) as usize).min(replicates.len() - 1)];
    Ratio {
        point,
        low: at(0.025),
        high: at(0.975),
    }
}

/// Percentile `p` (the `ceil(p·n)`-th smallest, as the report's tables take it) of the
/// samples of every round `r` repeated `weights[r]` times, each round sorted; in µs. Found by
/// bisecting on the value, counting with a binary search per round, so no replicate copies
/// the samples.
fn pooled_percentile(sorted: &[Vec<u32>], weights: &[u32], p: f64) -> f64 {
    let total: u64 = sorted
        .iter()
        .zip(weights)
        .map(|(r, &w)| r.len() as u64 * u64::from(w))
        .sum();
    if total == 0 {
        return f64::NAN;
    }
    let rank = ((p * total as f64).ceil() as u64).clamp(1, total);
    let at_most = |v: u32| -> u64 {
        sorted
            .iter()
            .zip(weights)
            .filter(|(_, w)| **w > 0)
            .map(|(r, &w)| r.partition_point(|&x| x <= v) as u64 * u64::from(w))
            .sum()
    };
    let (mut lo, mut hi) = (0u32, u32::MAX);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if at_most(mid) >= rank {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    f64::from(lo) / 1000.0
}

/// A small, seedable generator (SplitMix64): the bench's draws need to be repeatable, not
/// secret.
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0; the modulo bias is negligible for the small n used here).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Fisher–Yates.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooled_percentile_matches_sorting_the_pooled_samples() {
        let rounds = [vec![5, 1, 9, 3], vec![2, 8], vec![7, 7, 4]];
        let sorted: Vec<Vec<u32>> = rounds
            .iter()
            .map(|r| {
                let mut r = r.clone();
                r.sort_unstable();
                r
            })
            .collect();
        let weights = [2, 0, 1];
        let mut pooled: Vec<u32> = Vec::new();
        for (r, &w) in rounds.iter().zip(&weights) {
            for _ in 0..w {
                pooled.extend(r);
            }
        }
        pooled.sort_unstable();
        for p in [0.01, 0.25, 0.5, 0.9, 0.99, 1.0] {
            let idx = ((p * pooled.len() as f64).ceil() as usize).clamp(1, pooled.len()) - 1;
            assert_eq!(
                pooled_percentile(&sorted, &weights, p),
                f64::from(pooled[idx]) / 1000.0,
                "p = {p}"
            );
        }
    }

    /// Rounds of `base` µs (± a round-level shift), `n` samples each.
    fn rounds(base: u32, shifts: &[u32], n: u32) -> Vec<Vec<u32>> {
        shifts
            .iter()
            .map(|s| (0..n).map(|i| (base + s) * 1000 + i).collect())
            .collect()
    }

    #[test]
    fn a_clear_difference_is_met_or_missed_and_a_noisy_one_inconclusive() {
        let shifts = [0, 3, 1, 7, 2, 0, 5, 1, 2, 4];
        let direct = rounds(50, &shifts, 100);
        let slower = rounds(60, &shifts, 100);
        let r = percentile_ratio(&slower, &direct, 0.5);
        assert!(r.low <= r.point && r.point <= r.high, "{r}");
        assert!((1.1..1.3).contains(&r.point), "{r}");
        assert_eq!(judge(r, Bound::AtMost, 1.5), Verdict::Met);
        assert_eq!(judge(r, Bound::AtMost, 1.05), Verdict::Missed);
        // Round-level noise that moves one mode and not the other widens the interval
        // across a limit near the point: neither met nor missed.
        let noisy = rounds(50, &[0, 40, 0, 35, 0, 30, 0, 45, 0, 38], 100);
        let r = percentile_ratio(&noisy, &direct, 0.5);
        assert!(r.high - r.low > 0.3, "{r}");
        assert_eq!(judge(r, Bound::AtMost, r.point), Verdict::Inconclusive);
    }

    #[test]
    fn a_rate_ratio_pools_counts_over_time() {
        let a = [(100.0, 1.0), (300.0, 1.0)];
        let b = [(100.0, 1.0), (100.0, 1.0)];
        let r = rate_ratio(&a, &b);
        assert_eq!(r.point, 2.0);
        assert!(r.low >= 1.0 && r.high <= 3.0, "{r}");
        assert_eq!(judge(r, Bound::AtLeast, 0.9), Verdict::Met);
        assert_eq!(judge(r, Bound::Below, 1.0), Verdict::Missed);
    }

    #[test]
    fn the_same_data_gives_the_same_interval() {
        let a = rounds(70, &[0, 9, 2, 5, 1], 50);
        let b = rounds(50, &[3, 0, 8, 1, 2], 50);
        assert_eq!(
            percentile_ratio(&a, &b, 0.99),
            percentile_ratio(&a, &b, 0.99)
        );
    }

    #[test]
    fn a_shuffle_keeps_every_item() {
        let mut v: Vec<usize> = (0..9).collect();
        SplitMix(7).shuffle(&mut v);
        let mut s = v.clone();
        s.sort_unstable();
        assert_eq!(s, (0..9).collect::<Vec<_>>());
    }
}
