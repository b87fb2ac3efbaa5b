//! Connection templates: which earlier feature layers layer `i` reads.
//!
//! Indices are global (layer `i` of block 2 is still counted from `x0`), as in the
//! Log-DenseNet authors' public TensorFlow code. Every function here returns the
//! inputs of each layer `1 ..= L` sorted from nearest to farthest with no
//! duplicates; `result[0]` is the empty input list of `x0`.

use crate::spec::{HalfAndLogChain, InputCount, Template};

/// `floor(log2 i)` for `i >= 1`.
pub fn floor_log2(i: usize) -> usize {
    debug_assert!(i >= 1);
    (usize::BITS - 1 - i.leading_zeros()) as usize
}

/// Inputs of every layer `0 ..= depth` under `template` with one block.
/// `block_ends` lists the global index of the last layer of each block; only
/// LogLog-DenseNet uses it (every block end becomes a top-level key).
pub fn connections(template: &Template, depth: usize, block_ends: &[usize]) -> Vec<Vec<usize>> {
    let mut inputs: Vec<Vec<usize>> = match template {
        Template::DenseNet => (0..=depth).map(|i| (0..i).rev().collect()).collect(),
        Template::LogDenseNet => (0..=depth).map(log_inputs).collect(),
        Template::Nearest { count } => (0..=depth)
            .map(|i| {
                let m = input_count(*count, i);
                (i - m..i).rev().collect()
            })
            .collect(),
        Template::EvenlySpaced { count } => (0..=depth)
            .map(|i| {
                let m = input_count(*count, i);
                (0..m).map(|t| i - 1 - t * i / m).collect()
            })
            .collect(),
        Template::NearestHalfAndLog { chain } => (0..=depth)
            .map(|i| nearest_half_and_log(i, *chain))
            .collect(),
        Template::LogLogDenseNet { min_inputs, .. } => {
            loglog_connections(depth, *min_inputs, block_ends).0
        }
    };
    for list in &mut inputs {
        sort_nearest_first(list);
    }
    inputs
}

/// Inputs of every layer of FC-DenseNet (Jégou et al., "The One Hundred Layers
/// Tiramisu") with the given blocks: a down path of `blocks.len() / 2` blocks,
/// a bottleneck block and an up path of the same length.
///
/// Down-path and bottleneck layers read every earlier layer, because each block
/// input is the transition of the concatenation of `x0` and all earlier layers.
/// A layer of an up-path block at resolution level `d` reads three groups. The
/// first is the skip connection of level `d`: `x0` and every layer of down blocks
/// `0 ..= d`. Then come the layers of the previous block, which the transposed
/// conv upsamples, and the earlier layers of its own block. Transitions count as part of the layers they transform.
pub fn fc_densenet_connections(blocks: &[usize]) -> Vec<Vec<usize>> {
    let depth: usize = blocks.iter().sum();
    let down = blocks.len() / 2;
    let mut starts = Vec::with_capacity(blocks.len());
    let mut ends = Vec::with_capacity(blocks.len());
    let mut end = 0;
    for &n in blocks {
        starts.push(end + 1);
        end += n;
        ends.push(end);
    }

    let mut inputs = vec![Vec::new(); depth + 1];
    for (block, (&start, &end)) in starts.iter().zip(&ends).enumerate() {
        for (i, slot) in inputs.iter_mut().enumerate().take(end + 1).skip(start) {
            let mut list: Vec<usize> = if block <= down {
                (0..i).collect()
            } else {
                let level = blocks.len() - 1 - block;
                let mut list: Vec<usize> = (0..=ends[level]).collect();
                list.extend(starts[block - 1]..i);
                list
            };
            sort_nearest_first(&mut list);
            *slot = list;
        }
    }
    inputs
}

/// Layers that get the hub channel multiplier: the keys of the top-level
/// `lglg_conn(0, L)` call (empty for every other template).
pub fn hubs(template: &Template, depth: usize, block_ends: &[usize]) -> Vec<usize> {
    match template {
        Template::LogLogDenseNet { min_inputs, .. } => {
            loglog_connections(depth, *min_inputs, block_ends).1
        }
        _ => Vec::new(),
    }
}

/// Log-DenseNet inputs `i - 2^k` for `k = 0 ..= floor(log2 i)`, nearest first.
pub fn log_inputs(i: usize) -> Vec<usize> {
    if i == 0 {
        return Vec::new();
    }
    (0..=floor_log2(i)).map(|k| i - (1 << k)).collect()
}

fn input_count(count: InputCount, i: usize) -> usize {
    if i == 0 {
        return 0;
    }
    match count {
        InputCount::Log => floor_log2(i).max(1),
        InputCount::Half => i.div_ceil(2),
    }
}

fn nearest_half_and_log(i: usize, chain: HalfAndLogChain) -> Vec<usize> {
    if i == 0 {
        return Vec::new();
    }
    let recent = i.div_ceil(2);
    let mut inputs: Vec<usize> = (i - recent..i).collect();
    let oldest_recent = i - recent;
    let mut far = Vec::new();
    match chain {
        HalfAndLogChain::Paper => {
            // round(i / 2^k) for k = 2, 3, ... until it reaches 0.
            let mut k = 2;
            loop {
                let denom = 1usize << k;
                let j = (2 * i + denom) / (2 * denom);
                far.push(j);
                if j == 0 {
                    break;
                }
                k += 1;
            }
        }
        HalfAndLogChain::AuthorsCode => {
            let mut p = i / 2;
            far.push(p);
            while p > 0 {
                p = (p - 1) / 2;
                far.push(p);
            }
        }
    }
    inputs.extend(far.into_iter().filter(|&j| j < oldest_recent));
    inputs.sort_unstable();
    inputs.dedup();
    inputs
}

/// Runs `lglg_conn(0, L)` (Hu et al., "Log-DenseNet", appendix A), adds the chain
/// edge `i - 1`, then Log-DenseNet inputs from nearest to farthest until each layer
/// has `min_inputs` inputs (or runs out of candidates). Returns the inputs and the
/// top-level keys.
fn loglog_connections(
    depth: usize,
    min_inputs: usize,
    block_ends: &[usize],
) -> (Vec<Vec<usize>>, Vec<usize>) {
    let mut sets: Vec<std::collections::BTreeSet<usize>> = vec![Default::default(); depth + 1];
    for (i, set) in sets.iter_mut().enumerate().skip(1) {
        set.insert(i - 1);
    }
    let forced: Vec<usize> = block_ends.iter().copied().filter(|&e| e < depth).collect();
    let top_keys = lglg_conn(0, depth, &forced, &mut sets);

    let mut inputs: Vec<Vec<usize>> = Vec::with_capacity(depth + 1);
    for (i, set) in sets.into_iter().enumerate() {
        let mut list: Vec<usize> = set.into_iter().collect();
        for candidate in log_inputs(i) {
            if list.len() >= min_inputs {
                break;
            }
            if !list.contains(&candidate) {
                list.push(candidate);
            }
        }
        inputs.push(list);
    }
    (inputs, top_keys)
}

/// One call of `lglg_conn(s, t)`; `forced` adds keys to this call (used at the top
/// level for block ends). Returns the sorted keys of this call.
fn lglg_conn(
    s: usize,
    t: usize,
    forced: &[usize],
    sets: &mut [std::collections::BTreeSet<usize>],
) -> Vec<usize> {
    if t - s <= 1 {
        return Vec::new();
    }
    let delta = isqrt(t - s + 1);
    let mut keys: Vec<usize> = vec![s];
    let mut k = 0;
    while t >= s + k * delta {
        keys.push(t - k * delta);
        k += 1;
    }
    keys.extend(forced.iter().copied().filter(|&f| f >= s && f <= t));
    keys.sort_unstable();
    keys.dedup();

    // (a) dense connections among the keys.
    for (a, &hi) in keys.iter().enumerate() {
        for &lo in &keys[..a] {
            sets[hi].insert(lo);
        }
    }
    // (b) every layer of a segment reads the key that starts it.
    for pair in keys.windows(2) {
        for set in &mut sets[pair[0] + 1..=pair[1]] {
            set.insert(pair[0]);
        }
    }
    // (c) recurse into every segment.
    for pair in keys.windows(2) {
        lglg_conn(pair[0], pair[1], &[], sets);
    }
    keys
}

fn isqrt(n: usize) -> usize {
    let mut r = (n as f64).sqrt() as usize;
    while r * r > n {
        r -= 1;
    }
    while (r + 1) * (r + 1) <= n {
        r += 1;
    }
    r
}

fn sort_nearest_first(list: &mut Vec<usize>) {
    list.sort_unstable_by(|a, b| b.cmp(a));
    list.dedup();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_inputs_match_equation_two() {
        assert_eq!(log_inputs(1), vec![0]);
        assert_eq!(log_inputs(7), vec![6, 5, 3]);
        assert_eq!(log_inputs(8), vec![7, 6, 4, 0]);
    }

    #[test]
    fn nearest_and_evenly_spaced_counts() {
        let near = connections(
            &Template::Nearest {
                count: InputCount::Log,
            },
            16,
            &[],
        );
        assert_eq!(near[16], vec![15, 14, 13, 12]);
        let even = connections(
            &Template::EvenlySpaced {
                count: InputCount::Half,
            },
            8,
            &[],
        );
        assert_eq!(even[8], vec![7, 5, 3, 1]);
        assert_eq!(even[1], vec![0]);
    }

    #[test]
    fn nearest_half_and_log_chains() {
        let paper = nearest_half_and_log(16, HalfAndLogChain::Paper);
        // 8 most recent (8..15) plus round(16/4)=4, 2, 1, round(16/32)=1... 0.
        assert_eq!(paper, vec![0, 1, 2, 4, 8, 9, 10, 11, 12, 13, 14, 15]);
        let code = nearest_half_and_log(16, HalfAndLogChain::AuthorsCode);
        // floor(16/2)=8 is recent; then 3, 1, 0.
        assert_eq!(code, vec![0, 1, 3, 8, 9, 10, 11, 12, 13, 14, 15]);
    }

    #[test]
    fn fc_densenet_up_path_inputs() {
        // Blocks [2, 1, 2]: down x1 x2, bottleneck x3, up x4 x5 at level 0.
        let inputs = fc_densenet_connections(&[2, 1, 2]);
        assert_eq!(inputs[2], vec![1, 0]);
        assert_eq!(inputs[3], vec![2, 1, 0]);
        assert_eq!(inputs[4], vec![3, 2, 1, 0]);
        assert_eq!(inputs[5], vec![4, 3, 2, 1, 0]);
        // Blocks [1, 1, 1, 1, 1]: x4 (level 1) reads the level-1 skip x0..x2 and x3;
        // x5 (level 0) reads the level-0 skip x0, x1 and the previous block x4.
        let inputs = fc_densenet_connections(&[1, 1, 1, 1, 1]);
        assert_eq!(inputs[4], vec![3, 2, 1, 0]);
        assert_eq!(inputs[5], vec![4, 1, 0]);
    }

    #[test]
    fn loglog_top_level_keys() {
        // L = 16: delta = floor(sqrt(17)) = 4, keys {0, 4, 8, 12, 16}.
        let hubs = hubs(
            &Template::LogLogDenseNet {
                min_inputs: 1,
                hub_multiplier: 1,
            },
            16,
            &[],
        );
        assert_eq!(hubs, vec![0, 4, 8, 12, 16]);
    }
}
