//! Fully convolutional networks (FC-DenseNet, FC-Log-DenseNet) for segmentation.

use super::Builder;
use crate::features::FeatureGraph;
use crate::graph::ValueId;
use crate::{Error, Result};

/// Builds the down path, bottleneck block, up path and per-pixel heads.
pub(super) fn build(
    _b: &mut Builder,
    _features: &FeatureGraph,
    _image: ValueId,
) -> Result<Vec<(String, ValueId, f32)>> {
    // TODO: the segmentation expander is not written yet; specs with
    // `task: Segmentation(..)` parse, validate and analyse but do not expand.
    Err(Error::Unsupported {
        what: "expanding segmentation networks".into(),
    })
}
