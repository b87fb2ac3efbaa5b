//! Parameter counts of published architectures.

use ldnc_ir::{expand, spec::NetSpec, Mode};

fn params(ron: &str) -> usize {
    let spec = NetSpec::from_ron(ron, "inline").unwrap();
    spec.validate().unwrap();
    expand(&spec, Mode::Train).unwrap().graph.param_count()
}

#[test]
fn densenet_121_matches_torchvision() {
    let n = params(
        "(template: DenseNet, transition: Classic(compression: 0.5), blocks: [6, 12, 24, 16],
          growth: 32, init_channels: 64, stem: ImageNet,
          input: (height: 224, width: 224, channels: 3), classes: 1000)",
    );
    assert_eq!(n, 7_978_856);
}

#[test]
fn densenet_bc_100_cifar10() {
    let n = params("(template: DenseNet, transition: Classic(), blocks: [16, 16, 16], growth: 12)");
    assert_eq!(n, 769_162);
}
