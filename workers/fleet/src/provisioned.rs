//! How provisioned concurrency is spread over the workers, without a leader: every worker sees
//! the same registry and the same configuration, so each computes the same split (in proportion
//! to the workers' memory budgets) and boots its own share. When a worker joins or drops out of the registry the shares change and the others
//! boot or release the difference; a worker's lost sandboxes are booted again at its next pass.

/// This worker's share of `total` provisioned sandboxes of `function` over `workers` (live
/// worker ids with their memory budgets, any order): proportional to the budgets, rounded by
/// largest remainder, ties going round the workers from a point that depends on the function
/// (so remainders of different functions land on different workers). 0 when `me` is not among
/// `workers`.
#[must_use]
pub fn share(total: u32, workers: &[(String, u64)], me: &str, function: &str) -> u32 {
    let mut sorted: Vec<(&str, u64)> = workers.iter().map(|(w, b)| (w.as_str(), *b)).collect();
    sorted.sort_unstable();
    sorted.dedup_by(|a, b| a.0 == b.0);
    let Some(pos) = sorted.iter().position(|(w, _)| *w == me) else {
        return 0;
    };
    let n = sorted.len();
    // Zero budgets everywhere would divide by zero: split evenly then.
    let weights: Vec<u128> = if sorted.iter().all(|(_, b)| *b == 0) {
        vec![1; n]
    } else {
        sorted.iter().map(|(_, b)| u128::from(*b)).collect()
    };
    let sum: u128 = weights.iter().sum();
    let total_w = u128::from(total);
    let floors: Vec<u128> = weights.iter().map(|w| total_w * w / sum).collect();
    let left = total_w - floors.iter().sum::<u128>();
    let start = usize::try_from(fnv1a(function)).unwrap_or(0) % n;
    // Remainders as fractions of `sum`; larger first, then by rotated rank.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| {
        (
            std::cmp::Reverse(total_w * weights[i] % sum),
            (i + n - start) % n,
        )
    });
    let extra = order
        .iter()
        .take(usize::try_from(left).unwrap_or(usize::MAX))
        .any(|&i| i == pos);
    u32::try_from(floors[pos]).unwrap_or(u32::MAX) + u32::from(extra)
}

fn fnv1a(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn even(n: usize) -> Vec<(String, u64)> {
        (0..n).map(|i| (format!("w{i}"), 1024)).collect()
    }

    fn shares(total: u32, ws: &[(String, u64)], f: &str) -> Vec<u32> {
        ws.iter().map(|(w, _)| share(total, ws, w, f)).collect()
    }

    #[test]
    fn equal_budgets_split_evenly_and_add_up() {
        for n in 1..6 {
            let ws = even(n);
            for total in 0..20 {
                for f in ["a", "orders", "x-1"] {
                    let s = shares(total, &ws, f);
                    assert_eq!(s.iter().sum::<u32>(), total, "{n} workers, {total}");
                    let (lo, hi) = (
                        s.iter().min().expect("n > 0"),
                        s.iter().max().expect("n > 0"),
                    );
                    assert!(hi - lo <= 1, "{s:?}");
                }
            }
        }
    }

    #[test]
    fn remainders_of_different_functions_land_on_different_workers() {
        let ws = even(4);
        let firsts: std::collections::HashSet<usize> = ["a", "b", "c", "d", "e", "f", "g"]
            .iter()
            .map(|f| shares(1, &ws, f).iter().position(|s| *s == 1).expect("one"))
            .collect();
        assert!(firsts.len() > 1);
    }

    #[test]
    fn bigger_budgets_hold_more() {
        let ws = vec![("big".to_owned(), 3072), ("small".to_owned(), 1024)];
        assert_eq!(shares(4, &ws, "f"), [3, 1]);
        assert_eq!(shares(8, &ws, "f"), [6, 2]);
        for total in 0..30 {
            assert_eq!(shares(total, &ws, "g").iter().sum::<u32>(), total);
        }
    }

    #[test]
    fn a_worker_outside_the_registry_holds_none() {
        assert_eq!(share(4, &even(2), "gone", "f"), 0);
    }

    #[test]
    fn when_a_worker_drops_out_the_rest_take_its_share() {
        let before: u32 = shares(4, &even(3), "f")[..2].iter().sum();
        let after: u32 = shares(4, &even(2), "f").iter().sum();
        assert!(before < 4);
        assert_eq!(after, 4);
    }

    #[test]
    fn the_split_does_not_depend_on_listing_order() {
        let ws = vec![
            ("a".to_owned(), 512),
            ("b".to_owned(), 2048),
            ("c".to_owned(), 1024),
        ];
        let mut rev = ws.clone();
        rev.reverse();
        for (w, _) in &ws {
            assert_eq!(share(7, &ws, w, "f"), share(7, &rev, w, "f"));
        }
    }
}
