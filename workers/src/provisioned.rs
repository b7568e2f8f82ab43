//! How provisioned concurrency is spread over the workers, without a leader: every worker sees
//! the same registry and the same configuration, so each computes the same split and boots its
//! own share. When a worker joins or drops out of the registry the shares change and the others
//! boot or release the difference; a worker's lost sandboxes are booted again at its next pass.

/// This worker's share of `total` provisioned sandboxes of `function` over `workers` (live
/// worker ids, any order): `total / n` each, and one more for `total % n` of them, starting at a
/// point that depends on the function so that remainders of different functions land on
/// different workers. 0 when `me` is not among `workers`.
#[must_use]
pub fn share(total: u32, workers: &[String], me: &str, function: &str) -> u32 {
    let mut sorted: Vec<&str> = workers.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    sorted.dedup();
    let Some(pos) = sorted.iter().position(|w| *w == me) else {
        return 0;
    };
    let n = u32::try_from(sorted.len()).unwrap_or(u32::MAX);
    let pos = u32::try_from(pos).unwrap_or(0);
    let start = fnv1a(function) % n;
    let rank = (pos + n - start) % n;
    total / n + u32::from(rank < total % n)
}

fn fnv1a(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("w{i}")).collect()
    }

    #[test]
    fn shares_add_up_to_the_total_and_differ_by_at_most_one() {
        for n in 1..6 {
            let ws = ids(n);
            for total in 0..20 {
                for f in ["a", "orders", "x-1"] {
                    let shares: Vec<u32> = ws.iter().map(|w| share(total, &ws, w, f)).collect();
                    assert_eq!(shares.iter().sum::<u32>(), total, "{n} workers, {total}");
                    let (lo, hi) = (
                        shares.iter().min().expect("n > 0"),
                        shares.iter().max().expect("n > 0"),
                    );
                    assert!(hi - lo <= 1, "{shares:?}");
                }
            }
        }
    }

    #[test]
    fn a_worker_outside_the_registry_holds_none() {
        assert_eq!(share(4, &ids(2), "gone", "f"), 0);
    }

    #[test]
    fn when_a_worker_drops_out_the_rest_take_its_share() {
        let ws = ids(3);
        let before: u32 = ["w0", "w1"].iter().map(|w| share(4, &ws, w, "f")).sum();
        let after_ws = ids(2);
        let after: u32 = ["w0", "w1"]
            .iter()
            .map(|w| share(4, &after_ws, w, "f"))
            .sum();
        assert!(before < 4);
        assert_eq!(after, 4);
    }

    #[test]
    fn the_split_does_not_depend_on_listing_order() {
        let mut ws = ids(4);
        let a: Vec<u32> = ids(4).iter().map(|w| share(7, &ws, w, "f")).collect();
        ws.reverse();
        let b: Vec<u32> = ids(4).iter().map(|w| share(7, &ws, w, "f")).collect();
        assert_eq!(a, b);
    }
}
