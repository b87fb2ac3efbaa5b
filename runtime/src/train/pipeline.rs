//! The augmentation of training batches and the view of the test images that
//! evaluation scores, chosen from the dataset kind and the network's input.

use ldnc_ir::spec::InputSpec;

use crate::data::{Augment, DatasetKind};

use super::TrainError;

/// The augmentation of training batches and the view of each test image
/// that evaluation scores.
#[derive(Debug, Clone, PartialEq)]
pub struct Pipeline {
    pub train: Augment,
    pub eval: EvalView,
}

/// The input that evaluation feeds the network for each test image.
#[derive(Debug, Clone, PartialEq)]
pub enum EvalView {
    /// The image through one fixed transform: [`Augment::None`] for data
    /// stored at the network's size, a resize and centre crop for ImageNet.
    Whole(Augment),
    /// Square `size` x `size` tiles that together cover the image: tile
    /// corners step by `size`, and the last row and column of tiles sit flush
    /// with the bottom and right edges. Where tiles overlap, a pixel is scored
    /// only in the first tile, in row-major order, that contains it.
    Tiles { size: usize },
}

/// ImageNet evaluation resizes the shorter side to this many pixels per 224
/// of the crop, so a 224 crop keeps the usual resize-256, crop-224 evaluation.
const RESIZE_PER_224: usize = 256;

/// The largest sigma, in pixels, of the Gaussian blur that SVHN training
/// applies to half the images.
///
/// NOTE: Hu et al., "Log-DenseNet" (ICLR 2018), apply Gaussian blurs to SVHN
/// without giving a sigma, so this value is a choice that no run has tuned.
pub const SVHN_BLUR_SIGMA: f32 = 1.0;

impl Pipeline {
    /// CIFAR-style pad-and-crop with optional mirroring; test images are
    /// scored as stored.
    pub fn cifar(pad: usize, flip: bool) -> Pipeline {
        Pipeline {
            train: Augment::cifar(pad, flip),
            eval: EvalView::Whole(Augment::None),
        }
    }

    /// Picks the pipeline for a dataset of `kind` and a network whose input
    /// is `input`. `crop_padding` and `flip` come from the network's `train`
    /// section and apply to the datasets stored at the network's size.
    ///
    /// - CIFAR and Fashion-MNIST: pad-crop and flip.
    /// - SVHN: pad-crop without flip (digits are not mirror-symmetric), and
    ///   a Gaussian blur of sigma up to [`SVHN_BLUR_SIGMA`] on half the
    ///   images, as Hu et al. (2018) train it. A `crop_padding` of 0 keeps
    ///   only the blur.
    /// - ImageNet: random-resized crops of the input side with a mirror for
    ///   training. Evaluation resizes the shorter side to 256/224 of the input
    ///   side and takes a centre crop.
    /// - CamVid: random crops of the input side with a mirror for training,
    ///   and [`EvalView::Tiles`] for evaluation.
    pub fn for_dataset(
        kind: DatasetKind,
        input: InputSpec,
        crop_padding: usize,
        flip: bool,
    ) -> Result<Pipeline, TrainError> {
        let pipeline = match kind {
            DatasetKind::FashionMnist
            | DatasetKind::Cifar10
            | DatasetKind::Cifar100
            | DatasetKind::Cifar100Coarse => Pipeline::cifar(crop_padding, flip),
            DatasetKind::Svhn | DatasetKind::SvhnExtra => Pipeline {
                train: Augment::svhn(crop_padding, Some(SVHN_BLUR_SIGMA)),
                eval: EvalView::Whole(Augment::None),
            },
            DatasetKind::ImageNet => {
                let side = square_side(kind, input)?;
                Pipeline {
                    train: Augment::RandomResizedCrop { size: side },
                    eval: EvalView::Whole(Augment::ResizeCenterCrop {
                        resize: (side * RESIZE_PER_224).div_ceil(224),
                        crop: side,
                    }),
                }
            }
            DatasetKind::CamVid => {
                let size = square_side(kind, input)?;
                Pipeline {
                    train: Augment::RandomCrop { size },
                    eval: EvalView::Tiles { size },
                }
            }
        };
        Ok(pipeline)
    }

    /// Describes the pipeline in one line for the user, such as `training: random 224x224 crops with
    /// flips; evaluation: tiled 224x224 crops ...`.
    pub fn describe(&self) -> String {
        format!(
            "training: {}; evaluation: {}",
            describe_augment(&self.train),
            self.eval.describe()
        )
    }
}

impl EvalView {
    /// Describes what evaluation scores, in words.
    pub fn describe(&self) -> String {
        match self {
            EvalView::Whole(Augment::None) => "whole test images".into(),
            EvalView::Whole(augment) => describe_augment(augment),
            EvalView::Tiles { size } => format!(
                "tiled {size}x{size} crops covering each test image, each pixel scored once"
            ),
        }
    }
}

/// Describes an augmentation in words, such as `random-resized 224x224 crops with flips`.
pub fn describe_augment(augment: &Augment) -> String {
    match *augment {
        Augment::None => "no augmentation".into(),
        Augment::PadCrop {
            pad,
            flip,
            blur_sigma,
        } => {
            let mut parts = Vec::new();
            if pad > 0 {
                parts.push(format!("{pad}-pixel pad and random crop"));
            }
            if flip {
                parts.push("flips".to_string());
            }
            if let Some(sigma) = blur_sigma {
                parts.push(format!(
                    "Gaussian blur up to sigma {sigma} on half the images"
                ));
            }
            if parts.is_empty() {
                return "no augmentation".into();
            }
            parts.join(", ")
        }
        Augment::RandomResizedCrop { size } => {
            format!("random-resized {size}x{size} crops with flips")
        }
        Augment::ResizeCenterCrop { resize, crop } => {
            format!("shorter side resized to {resize}, centre {crop}x{crop} crop")
        }
        Augment::RandomCrop { size } => format!("random {size}x{size} crops with flips"),
    }
}

/// Returns the side of a square network input, which the crop augmentations
/// need, and rejects a non-square one.
fn square_side(kind: DatasetKind, input: InputSpec) -> Result<usize, TrainError> {
    if input.height == input.width {
        return Ok(input.height);
    }
    Err(TrainError::Incompatible {
        dataset: kind.name().into(),
        network: "this network".into(),
        reason: format!(
            "its input is {}x{}, but {} crops are square; set `input` to a square size",
            input.height,
            input.width,
            kind.name()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const INPUT_32: InputSpec = InputSpec {
        height: 32,
        width: 32,
        channels: 3,
    };

    #[test]
    fn svhn_pipeline_blurs_without_flips() {
        for kind in [DatasetKind::Svhn, DatasetKind::SvhnExtra] {
            let pipeline = Pipeline::for_dataset(kind, INPUT_32, 2, true).expect("square input");
            let expected = Augment::PadCrop {
                pad: 2,
                flip: false,
                blur_sigma: Some(SVHN_BLUR_SIGMA),
            };
            assert_eq!(pipeline.train, expected, "{kind:?}");
            assert_eq!(pipeline.eval, EvalView::Whole(Augment::None), "{kind:?}");
        }
    }

    #[test]
    fn cifar_pipeline_has_no_blur() {
        let pipeline =
            Pipeline::for_dataset(DatasetKind::Cifar10, INPUT_32, 4, true).expect("square input");
        assert_eq!(pipeline.train, Augment::cifar(4, true));
    }

    #[test]
    fn describe_names_each_pad_crop_part() {
        assert_eq!(
            describe_augment(&Augment::cifar(4, true)),
            "4-pixel pad and random crop, flips"
        );
        assert_eq!(
            describe_augment(&Augment::svhn(2, Some(1.0))),
            "2-pixel pad and random crop, Gaussian blur up to sigma 1 on half the images"
        );
        assert_eq!(
            describe_augment(&Augment::svhn(0, Some(0.5))),
            "Gaussian blur up to sigma 0.5 on half the images"
        );
        assert_eq!(describe_augment(&Augment::svhn(0, None)), "no augmentation");
    }
}
