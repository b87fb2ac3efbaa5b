//! Parameter counts, multiply-accumulates and output shapes of small networks,
//! derived by hand in the comments, plus fuzzing of the RON reader and checks
//! that validation names the offending field.
//!
//! Conventions of the counts: convs have no bias, a batch norm has a scale and a
//! shift per channel (2 C), a linear layer has a bias, and MACs count convs,
//! transposed convs and linear layers per image. A bottleneck layer with growth
//! g = 4 and `cin` input channels is BN(cin) + 1x1 conv(cin -> 16) + BN(16) +
//! 3x3 conv(16 -> 4): 2 cin + 16 cin + 32 + 576 = 18 cin + 608 parameters and
//! HW (16 cin + 576) MACs. Without a bottleneck it is BN(cin) + 3x3 conv(cin -> g).

use std::path::Path;

use ldnc_ir::analysis::Report;
use ldnc_ir::spec::NetSpec;
use ldnc_ir::{expand, Mode, Network};
use proptest::prelude::*;

fn build(text: &str) -> (NetSpec, Network, Report) {
    let spec = NetSpec::from_ron(text, "counts.rs").expect("the literal parses");
    spec.validate().expect("the literal is valid");
    let net = expand(&spec, Mode::Train).expect("the network expands");
    let report = Report::new(&spec, &net, 1).expect("the report computes");
    (spec, net, report)
}

fn dims(net: &Network, name: &str) -> Vec<usize> {
    let id = net
        .graph
        .find(name)
        .unwrap_or_else(|| panic!("no node {name}"));
    net.graph.node(id).ty.dims.clone()
}

/// Log-DenseNet V1, blocks [3, 3], growth 4, bottleneck 4g, x0 of 8 channels,
/// 32x32x3 input, 10 classes.
///
/// Inputs (global indices): x1 {0}, x2 {1, 0}, x3 {2, 1}, x4 {3, 2, 0},
/// x5 {4, 3, 1}, x6 {5, 4, 2}; cin = 8, 12, 8, 16, 12, 12 (sum 68); 14 connections.
/// - stem 3x3 conv 3 -> 8: 216 parameters, 1024 * 8 * 27 = 221,184 MACs.
/// - layers: 18 * 68 + 6 * 608 = 4,872 parameters. MACs: block 0 at 32x32 is
///   1024 * (16 * 28 + 3 * 576) = 2,228,224; block 1 at 16x16 is
///   256 * (16 * 40 + 3 * 576) = 606,208.
/// - transition: x0..x3 are all read after x3, so each gets BN(c) + 1x1 conv(c -> c):
///   (16 + 64) + 3 * (8 + 16) = 152 parameters, 1024 * (64 + 3 * 16) = 114,688 MACs.
/// - head on x6 and its inputs x5, x4, x2 (16 channels): BN 32 + linear 160 + bias
///   10 = 202 parameters, 160 MACs.
///
/// Total 216 + 4,872 + 152 + 202 = 5,442 parameters and 3,170,464 MACs. MBD is 2:
/// every pair is at most one hop apart through x1, x2 or x4 (for example
/// x6 -> x2 -> x0 and x5 -> x1 -> x0).
#[test]
fn log_densenet_v1_small() {
    let (_, net, report) = build(
        "(template: LogDenseNet, transition: Independent, blocks: [3, 3], growth: 4,
          bottleneck: Some(4))",
    );
    assert_eq!(report.params, 5_442);
    assert_eq!(report.macs_per_image, 3_170_464);
    assert_eq!(report.connections, 14);
    assert_eq!(report.mbd, 2);
    assert_eq!(dims(&net, "layer3.conv2"), vec![32, 32, 4]);
    assert_eq!(dims(&net, "transition0.x0.pool"), vec![16, 16, 8]);
    assert_eq!(dims(&net, "layer6.conv2"), vec![16, 16, 4]);
    assert_eq!(net.graph.node(net.final_logits()).ty.dims, vec![10]);
    assert_eq!(net.heads.len(), 1);
}

/// Log-DenseNet V2, blocks [2, 2], growth 4, bottleneck 4g, x0 of 8 channels.
///
/// A layer reads its block's compressed features plus its log inputs inside the
/// block: x1 [x0] (8), x2 [x0, x1] (12), x3 [C1] (16), x4 [C1, x3] (20).
/// - C1: the block of x1, x2 (8 channels) is compressed to
///   min(g (floor(log2 5) + 1), 2 g) = min(12, 8) = 8 channels, x0 passes through a
///   channel-preserving 1x1 conv, both are pooled: C1 has 16 channels at 16x16.
///   Parameters (16 + 64) + (16 + 64) = 160; MACs 1024 * (64 + 64) = 131,072.
/// - stem 216 parameters, 221,184 MACs.
/// - layers 18 * 56 + 4 * 608 = 3,440 parameters; MACs
///   1024 * (16 * 20 + 2 * 576) = 1,507,328 and 256 * (16 * 36 + 2 * 576) = 442,368.
/// - head on [x4, C1, x3] (24 channels): 48 + 240 + 10 = 298 parameters, 240 MACs.
///
/// Total 216 + 3,440 + 160 + 298 = 4,114 parameters and 2,302,192 MACs.
/// Connections: x1 1, x2 2, x3 1, x4 2 (a compressed read counts as one) = 6.
#[test]
fn log_densenet_v2_small() {
    let (_, net, report) = build(
        "(template: LogDenseNet, transition: BlockCompression, blocks: [2, 2], growth: 4,
          bottleneck: Some(4))",
    );
    assert_eq!(report.params, 4_114);
    assert_eq!(report.macs_per_image, 2_302_192);
    assert_eq!(report.connections, 6);
    assert_eq!(dims(&net, "transition0.concat"), vec![16, 16, 16]);
    assert_eq!(dims(&net, "layer4.conv2"), vec![16, 16, 4]);
    assert_eq!(net.graph.node(net.final_logits()).ty.dims, vec![10]);
}

/// DenseNet with the classic transition (compression 0.5), blocks [2, 2], growth 4,
/// no bottleneck, deep supervision. A layer is BN(cin) + 3x3 conv(cin -> 4):
/// 38 cin parameters and 36 cin MACs per pixel.
///
/// - stem 216 parameters, 221,184 MACs.
/// - x1 [x0] 8, x2 [x0, x1] 12, x3 [C1] 8, x4 [C1, x3] 12: 38 * 40 = 1,520
///   parameters; MACs 1024 * 36 * 20 = 737,280 and 256 * 36 * 20 = 184,320.
/// - transition on [x0, x1, x2] (16 channels): BN 32 + 1x1 conv 16 -> 8 = 160
///   parameters, 1024 * 128 = 131,072 MACs; C1 is 16x16x8.
/// - auxiliary head on [x2, x0, x1] and final head on [x4, C1, x3], 16 channels
///   each: 2 * (32 + 160 + 10) = 404 parameters, 320 MACs.
///
/// Total 216 + 1,520 + 160 + 404 = 2,300 parameters and 1,274,176 MACs. The two
/// heads share the loss equally (half on the final head, half on the one
/// auxiliary head).
#[test]
fn densenet_no_bottleneck_small() {
    let (_, net, report) = build(
        "(template: DenseNet, transition: Classic(compression: 0.5), blocks: [2, 2],
          growth: 4, bottleneck: None, deep_supervision: true)",
    );
    assert_eq!(report.params, 2_300);
    assert_eq!(report.macs_per_image, 1_274_176);
    assert_eq!(dims(&net, "transition0.pool"), vec![16, 16, 8]);
    assert_eq!(net.heads.len(), 2);
    assert_eq!(net.heads[0].weight, 0.5);
    assert_eq!(net.heads[1].weight, 0.5);
}

/// FC-DenseNet with blocks [1, 1, 1], growth 2, x0 of 4 channels, 8x8x3 input and
/// 3 classes. A layer is BN(cin) + 3x3 conv(cin -> 2): 20 cin parameters and
/// 18 cin MACs per pixel.
///
/// - stem 3x3 conv 3 -> 4: 108 parameters, 64 * 4 * 27 = 6,912 MACs.
/// - x1 on x0 (4): 80 parameters, 64 * 72 = 4,608 MACs.
/// - down transition on [x0, x1] (6): BN 12 + 1x1 conv 36 = 48 parameters,
///   64 * 36 = 2,304 MACs, then 2x2 max pooling to 4x4x6.
/// - x2 (bottleneck block, 4x4) on the pooled 6 channels: 120 parameters,
///   16 * 108 = 1,728 MACs.
/// - up transition: 3x3 transposed conv 2 -> 2 (36 parameters) from 4x4 to 9x9,
///   16 * 2 * 9 * 2 = 576 MACs, cropped to 8x8.
/// - x3 on [up, skip] (2 + 6 = 8): 160 parameters, 64 * 144 = 9,216 MACs.
/// - final 1x1 conv on [up, skip, x3] (10) -> 3, no BN: 30 parameters, 1,920 MACs.
///
/// Total 582 parameters and 27,264 MACs; logits are 8x8x3.
#[test]
fn fc_densenet_small() {
    let (_, net, report) = build(
        "(template: DenseNet, transition: Classic(compression: 1.0), blocks: [1, 1, 1],
          growth: 2, bottleneck: None, init_channels: Some(4), classes: 3,
          input: (height: 8, width: 8, channels: 3),
          task: Segmentation(ignore_label: Some(3), first_block_skip: false))",
    );
    assert_eq!(report.params, 582);
    assert_eq!(report.macs_per_image, 27_264);
    assert_eq!(dims(&net, "down0.pool"), vec![4, 4, 6]);
    assert_eq!(dims(&net, "up2.convt"), vec![9, 9, 2]);
    assert_eq!(dims(&net, "up2.crop"), vec![8, 8, 2]);
    assert_eq!(net.graph.node(net.final_logits()).ty.dims, vec![8, 8, 3]);
    assert_eq!(net.graph.node(net.label).ty.dims, vec![8, 8]);
}

/// Texts of every example network, the seeds of the fuzzer.
fn seeds() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut texts: Vec<String> = std::fs::read_dir(dir)
        .expect("examples/ exists")
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|e| e == "ron"))
        .map(|path| std::fs::read_to_string(path).expect("example files are readable"))
        .collect();
    texts.sort();
    texts.push("(blocks: [4, 4], growth: 8)".into());
    texts
}

/// One edit of a text: delete or duplicate a span, insert text, or truncate.
#[derive(Debug, Clone)]
enum Mutation {
    Delete { at: usize, len: usize },
    Duplicate { at: usize, len: usize },
    Insert { at: usize, text: String },
    Truncate { at: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let tokens = prop::sample::select(vec![
        "(",
        ")",
        "[",
        "]",
        ",",
        ":",
        "Some(",
        "None",
        "-1",
        "0",
        "1e400",
        "\"",
        "//",
        "/*",
        "growth",
        "blocks: []",
        "9999999999999999999999",
        "\u{e9}",
        "\n",
    ]);
    prop_oneof![
        (any::<usize>(), 1usize..20).prop_map(|(at, len)| Mutation::Delete { at, len }),
        (any::<usize>(), 1usize..40).prop_map(|(at, len)| Mutation::Duplicate { at, len }),
        (any::<usize>(), tokens).prop_map(|(at, t)| Mutation::Insert {
            at,
            text: t.to_string()
        }),
        (any::<usize>(), "[ -~]{1,8}").prop_map(|(at, text)| Mutation::Insert { at, text }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
    ]
}

fn apply(text: &str, mutation: &Mutation) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    let n = chars.len().max(1);
    match mutation {
        Mutation::Delete { at, len } => {
            let start = at % n;
            let end = (start + len).min(chars.len());
            chars.drain(start.min(end)..end);
        }
        Mutation::Duplicate { at, len } => {
            let start = (at % n).min(chars.len());
            let end = (start + len).min(chars.len());
            let copy: Vec<char> = chars[start..end].to_vec();
            chars.splice(end..end, copy);
        }
        Mutation::Insert { at, text } => {
            let at = (at % n).min(chars.len());
            chars.splice(at..at, text.chars());
        }
        Mutation::Truncate { at } => chars.truncate(at % n),
    }
    chars.into_iter().collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// The RON reader, overrides and validation return errors, never panic, on
    /// mutated example files.
    #[test]
    fn mutated_files_never_panic(
        seed in prop::sample::select(seeds()),
        mutations in prop::collection::vec(mutation(), 1..4),
        set in "[a-z_.]{1,12}=[ -~]{0,12}",
    ) {
        let mut text = seed;
        for m in &mutations {
            text = apply(&text, m);
        }
        if let Ok(spec) = NetSpec::from_ron(&text, "fuzz.ron") {
            let _ = spec.validate();
            let _ = spec.with_overrides(&[set]);
        }
    }

    /// Random printable text never makes the reader panic.
    #[test]
    fn random_text_never_panics(text in "[ -~\n]{0,200}") {
        let _ = NetSpec::from_ron(&text, "fuzz.ron");
    }

    /// Each invalid value is rejected with an error that names its field.
    #[test]
    fn validation_names_field(
        seed in prop::sample::select(seeds()),
        case in 0usize..11,
    ) {
        let mut spec = NetSpec::from_ron(&seed, "seed.ron").expect("seeds parse");
        prop_assert!(spec.validate().is_ok());
        let field = match case {
            0 => { spec.growth = 0; "growth" }
            1 => { spec.blocks.clear(); "blocks" }
            2 => { spec.blocks.push(0); "blocks" }
            3 => { spec.bottleneck = Some(0); "bottleneck" }
            4 => { spec.init_channels = Some(0); "init_channels" }
            5 => { spec.classes = 1; "classes" }
            6 => { spec.input.width = 0; "input" }
            7 => { spec.dropout = 1.0; "dropout" }
            8 => {
                spec.transition = ldnc_ir::spec::Transition::Classic { compression: 0.0 };
                "transition.compression"
            }
            9 => {
                spec.template = ldnc_ir::spec::Template::LogLogDenseNet {
                    min_inputs: 4,
                    hub_multiplier: 0,
                };
                "template.hub_multiplier"
            }
            _ => { spec.input.height = 1; "blocks" }
        };
        let message = spec.validate().err().map(|e| e.to_string()).unwrap_or_default();
        prop_assert!(message.contains(&format!("`{field}`")), "case {case}: {message:?}");
    }
}
