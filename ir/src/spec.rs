//! The network language: the plain `NetSpec` that a RON file deserialises into,
//! `--set path=value` overrides, and validation into a spec the expander accepts.
//!
//! Parsing happens in three steps, kept apart so each error names its source:
//! RON text into a `NetSpec` (syntax errors carry line and column), overrides
//! applied on a JSON view of the spec (unknown paths list the allowed fields), then
//! `NetSpec::validate` (semantic errors name the field and the allowed values).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How feature layer `i` chooses its inputs among earlier feature layers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Template {
    /// Every earlier layer (Huang et al., "Densely Connected Convolutional Networks").
    DenseNet,
    /// Layers `i - 2^k` for `k = 0 ..= floor(log2 i)` (Hu et al., "Log-DenseNet", eq. 2).
    LogDenseNet,
    /// The recursive `lglg_conn(0, L)` pattern, augmented with Log-DenseNet inputs
    /// (nearest first) until a layer has `min_inputs` inputs; the keys of the
    /// top-level call ("hubs") get `hub_multiplier` times the growth rate.
    LogLogDenseNet {
        #[serde(default = "default_min_inputs")]
        min_inputs: usize,
        #[serde(default = "default_one")]
        hub_multiplier: usize,
    },
    /// The most recent `count` layers.
    Nearest { count: InputCount },
    /// `count` earlier layers spread evenly over `0 .. i`.
    EvenlySpaced { count: InputCount },
    /// The `ceil(i/2)` most recent layers plus a chain of far layers.
    NearestHalfAndLog {
        #[serde(default)]
        chain: HalfAndLogChain,
    },
}

/// Number of inputs of layer `i` for the NEAREST and EVENLY-SPACED baselines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InputCount {
    /// `floor(log2 i)` inputs, at least one.
    Log,
    /// `ceil(i / 2)` inputs.
    Half,
}

/// The far-layer chain of NearestHalfAndLog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum HalfAndLogChain {
    /// Layers with index `round(i/4)`, `round(i/8)`, ... as the paper defines it.
    #[default]
    Paper,
    /// `floor(i/2)`, then `(p - 1) / 2` repeatedly down to 0, as the authors' public
    /// TensorFlow code does.
    AuthorsCode,
}

/// What happens between two blocks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Transition {
    /// Log-DenseNet V1: every earlier layer that a later layer reads is pooled on its
    /// own by BN-ReLU, a channel-preserving 1x1 conv and 2x2 average pooling.
    Independent,
    /// Log-DenseNet V2: the finished block is concatenated and compressed by a 1x1
    /// conv to `min(g * (floor(log2(L + 1)) + 1), n * g)` channels; older compressed
    /// features pass through a channel-preserving 1x1 conv.
    BlockCompression,
    /// DenseNet-BC: BN-ReLU-1x1 conv on the concatenation of everything so far, to
    /// `floor(compression * channels)` channels, then 2x2 average pooling.
    Classic {
        #[serde(default = "default_compression")]
        compression: f64,
    },
}

/// The layers between the input image and `x0`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Stem {
    /// One 3x3 conv of stride 1 (CIFAR, SVHN, Fashion-MNIST).
    Cifar,
    /// 7x7 conv of stride 2, BN-ReLU, 3x3 max pool of stride 2 (ILSVRC).
    ImageNet,
    /// 3x3 conv of stride 1 followed by BN-ReLU (FC-DenseNet's first conv layer reads
    /// the image directly and every later layer pre-activates).
    Plain,
}

/// What the network predicts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Task {
    /// One label per image: BN-ReLU, global average pooling and a linear layer.
    Classification,
    /// One label per pixel (FC-DenseNet / FC-Log-DenseNet): the blocks given in
    /// `blocks` form a down path of `(blocks.len() - 1) / 2` blocks, a bottleneck
    /// block, and an up path of the same length with transposed-conv up transitions.
    Segmentation {
        /// Label that the loss and the metrics ignore (CamVid's void class).
        #[serde(default)]
        ignore_label: Option<u32>,
        /// Add the last layer of the first block to the inputs of every later layer.
        #[serde(default = "default_true")]
        first_block_skip: bool,
    },
}

/// Image size and channel count of the network input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputSpec {
    pub height: usize,
    pub width: usize,
    pub channels: usize,
}

/// A whole network as written in a RON file. Every field but `blocks` and `growth`
/// has a default, so a short file is enough.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetSpec {
    #[serde(default = "default_name")]
    pub name: String,
    #[serde(default = "default_template")]
    pub template: Template,
    #[serde(default = "default_transition")]
    pub transition: Transition,
    /// Number of feature layers in each block.
    pub blocks: Vec<usize>,
    /// Growth rate `g`: channels produced by each feature layer.
    pub growth: usize,
    /// Bottleneck width as a multiple of `g` (BN-ReLU-1x1 conv(width * g) before
    /// the 3x3 conv); `None` makes each layer a single BN-ReLU-3x3 conv.
    #[serde(default = "default_bottleneck")]
    pub bottleneck: Option<usize>,
    /// Channels of `x0`; `None` means `2 * growth`.
    #[serde(default)]
    pub init_channels: Option<usize>,
    #[serde(default = "default_stem")]
    pub stem: Stem,
    #[serde(default = "default_input")]
    pub input: InputSpec,
    #[serde(default = "default_classes")]
    pub classes: usize,
    /// Auxiliary predictions at the end of every block but the last; the final
    /// prediction gets half the loss weight, the rest is spread evenly.
    #[serde(default)]
    pub deep_supervision: bool,
    /// Dropout rate after each 3x3 conv of a feature layer (0 disables it).
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "default_task")]
    pub task: Task,
    /// Batch-norm epsilon and running-statistics momentum (PyTorch's convention:
    /// `running = (1 - momentum) * running + momentum * batch`).
    #[serde(default = "default_bn_eps")]
    pub bn_eps: f64,
    #[serde(default = "default_bn_momentum")]
    pub bn_momentum: f64,
    /// Training defaults, overridable from the command line.
    #[serde(default)]
    pub train: TrainSpec,
}

/// Optimiser and schedule defaults stored with the network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// The update rule. `momentum` and `nesterov` apply to SGD only.
    #[serde(default)]
    pub optimizer: Optimizer,
    #[serde(default = "default_momentum")]
    pub momentum: f64,
    #[serde(default)]
    pub nesterov: bool,
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    #[serde(default = "default_batch")]
    pub batch: usize,
    #[serde(default = "default_epochs")]
    pub epochs: usize,
    #[serde(default)]
    pub schedule: LrSchedule,
    /// Random crop padding in pixels (0 disables random crops).
    #[serde(default = "default_crop_pad")]
    pub crop_padding: usize,
    #[serde(default = "default_true")]
    pub flip: bool,
}

/// The optimizer that updates the parameters from their gradients.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub enum Optimizer {
    /// SGD with the train section's `momentum`, Nesterov's when `nesterov`
    /// is set, and weight decay.
    #[default]
    Sgd,
    /// RMSprop with weight decay: each parameter's step is divided by the
    /// root of a running mean of its squared gradients,
    /// `s = decay * s + (1 - decay) * g^2`, `p -= lr * g / (sqrt(s) + eps)`.
    RmsProp {
        #[serde(default = "default_rmsprop_decay")]
        decay: f64,
        #[serde(default = "default_rmsprop_eps")]
        eps: f64,
    },
}

/// Learning-rate schedule over the whole run.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub enum LrSchedule {
    /// Divide by 10 after 1/2 and after 3/4 of the iterations.
    #[default]
    Step,
    /// Cosine decay from `lr` to 0.
    Cosine,
    /// Constant rate.
    Constant,
    /// Multiply the rate by `decay` after every epoch: `lr * decay^epoch`.
    Exponential { decay: f64 },
}

impl Default for TrainSpec {
    fn default() -> Self {
        TrainSpec {
            lr: default_lr(),
            optimizer: Optimizer::Sgd,
            momentum: default_momentum(),
            nesterov: false,
            weight_decay: default_weight_decay(),
            batch: default_batch(),
            epochs: default_epochs(),
            schedule: LrSchedule::Step,
            crop_padding: default_crop_pad(),
            flip: true,
        }
    }
}

fn default_name() -> String {
    "net".to_string()
}
fn default_template() -> Template {
    Template::LogDenseNet
}
fn default_transition() -> Transition {
    Transition::Independent
}
fn default_bottleneck() -> Option<usize> {
    Some(4)
}
fn default_stem() -> Stem {
    Stem::Cifar
}
fn default_input() -> InputSpec {
    InputSpec {
        height: 32,
        width: 32,
        channels: 3,
    }
}
fn default_classes() -> usize {
    10
}
fn default_task() -> Task {
    Task::Classification
}
fn default_min_inputs() -> usize {
    4
}
fn default_one() -> usize {
    1
}
fn default_true() -> bool {
    true
}
fn default_compression() -> f64 {
    0.5
}
fn default_bn_eps() -> f64 {
    1e-5
}
fn default_bn_momentum() -> f64 {
    0.1
}
fn default_lr() -> f64 {
    0.1
}
fn default_momentum() -> f64 {
    0.9
}
fn default_rmsprop_decay() -> f64 {
    0.9
}
fn default_rmsprop_eps() -> f64 {
    1e-6
}
fn default_weight_decay() -> f64 {
    1e-4
}
fn default_batch() -> usize {
    64
}
fn default_epochs() -> usize {
    250
}
fn default_crop_pad() -> usize {
    4
}

/// Names of the templates as written in RON, for error messages.
pub const TEMPLATE_NAMES: &str = "DenseNet, LogDenseNet, LogLogDenseNet(min_inputs: 4, \
    hub_multiplier: 1), Nearest(count: Log|Half), EvenlySpaced(count: Log|Half), \
    NearestHalfAndLog(chain: Paper|AuthorsCode)";

impl NetSpec {
    /// Parses RON text; `origin` names the file in error messages.
    pub fn from_ron(text: &str, origin: &str) -> Result<NetSpec> {
        ron::Options::default()
            .with_default_extension(ron::extensions::Extensions::IMPLICIT_SOME)
            .from_str::<NetSpec>(text)
            .map_err(|e| Error::Syntax {
                file: origin.to_string(),
                line: e.position.line,
                column: e.position.col,
                message: e.code.to_string(),
                hint: syntax_hint(&e.code),
            })
    }

    /// Reads, parses, applies `overrides` (`path=value` strings) and validates.
    pub fn load(path: &Path, overrides: &[String]) -> Result<NetSpec> {
        let name = path.display().to_string();
        if path.is_dir() {
            return Err(Error::Folder { path: name });
        }
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: name.clone(),
            source,
        })?;
        // Binary files such as checkpoints often contain NUL bytes even where
        // their bytes happen to be valid UTF-8, and no RON syntax uses a raw NUL.
        let text = match String::from_utf8(bytes) {
            Ok(text) if !text.contains('\0') => text,
            _ => return Err(Error::NotText { path: name }),
        };
        let spec = NetSpec::from_ron(&text, &name)?;
        let spec = spec.with_overrides(overrides)?;
        spec.validate()?;
        Ok(spec)
    }

    /// Applies `path=value` overrides, where `path` is a dotted field path and `value`
    /// is written in RON (`blocks=[32,32,32]`, `template=LogDenseNet`,
    /// `train.lr=0.05`, `template.min_inputs=6`).
    pub fn with_overrides(&self, overrides: &[String]) -> Result<NetSpec> {
        if overrides.is_empty() {
            return Ok(self.clone());
        }
        let mut root = serde_json::to_value(self).expect("NetSpec always serialises to JSON");
        for item in overrides {
            let (path, value_text) = item.split_once('=').ok_or_else(|| Error::Override {
                item: item.clone(),
                message: "expected PATH=VALUE, for example `growth=16`".into(),
            })?;
            let value = ron_text_to_json(value_text.trim()).map_err(|message| Error::Override {
                item: item.clone(),
                message,
            })?;
            set_path(&mut root, path.trim(), value).map_err(|message| Error::Override {
                item: item.clone(),
                message,
            })?;
            // Round-trip through `NetSpec` so that a replaced enum variant gets its
            // defaulted fields, which a later `--set` may then name.
            let spec: NetSpec = serde_json::from_value(root).map_err(|e| Error::Override {
                item: item.clone(),
                message: format!("the resulting spec is invalid: {e}"),
            })?;
            root = serde_json::to_value(&spec).expect("NetSpec always serialises to JSON");
        }
        serde_json::from_value(root).map_err(|e| Error::Override {
            item: overrides.join(" "),
            message: format!("the resulting spec is invalid: {e}"),
        })
    }

    /// Channels of `x0`.
    pub fn x0_channels(&self) -> usize {
        self.init_channels.unwrap_or(2 * self.growth)
    }

    /// Total number of feature layers `L` (x1..xL; x0 is not counted).
    pub fn depth(&self) -> usize {
        self.blocks.iter().sum()
    }

    /// Checks the semantic rules that the expander relies on.
    pub fn validate(&self) -> Result<()> {
        let invalid = |field: &str, message: String| {
            Err(Error::InvalidSpec {
                field: field.to_string(),
                message,
            })
        };
        if self.blocks.is_empty() {
            return invalid(
                "blocks",
                "at least one block is required, e.g. [12, 12, 12]".into(),
            );
        }
        if let Some(b) = self.blocks.iter().position(|&n| n == 0) {
            return invalid(
                "blocks",
                format!("block {b} has no layers; every block needs at least one"),
            );
        }
        if self.growth == 0 {
            return invalid(
                "growth",
                "must be at least 1 (the paper uses 12 to 48)".into(),
            );
        }
        if self.train.batch == 0 {
            return invalid(
                "train.batch",
                "is 0; a training step needs at least 1 image, e.g. 64".into(),
            );
        }
        if self.train.epochs == 0 {
            return invalid(
                "train.epochs",
                "is 0; training needs at least 1 epoch, e.g. 300".into(),
            );
        }
        if let Optimizer::RmsProp { decay, eps } = self.train.optimizer {
            if !(0.0..1.0).contains(&decay) {
                return invalid(
                    "train.optimizer.decay",
                    format!("is {decay}; RMSprop's decay must be in [0, 1), e.g. 0.9"),
                );
            }
            if eps.is_nan() || eps <= 0.0 {
                return invalid(
                    "train.optimizer.eps",
                    format!("is {eps}; it must be positive, e.g. 1e-6"),
                );
            }
        }
        if let LrSchedule::Exponential { decay } = self.train.schedule {
            if decay.is_nan() || decay <= 0.0 || decay > 1.0 {
                return invalid(
                    "train.schedule.decay",
                    format!("is {decay}; it must be in (0, 1], e.g. 0.995"),
                );
            }
        }
        if self.bottleneck == Some(0) {
            return invalid("bottleneck", "must be None or a width of at least 1".into());
        }
        if self.init_channels == Some(0) {
            return invalid(
                "init_channels",
                "must be None (2 * growth) or at least 1".into(),
            );
        }
        if self.classes < 2 {
            return invalid("classes", format!("got {}, need at least 2", self.classes));
        }
        let InputSpec {
            height,
            width,
            channels,
        } = self.input;
        if height == 0 || width == 0 || channels == 0 {
            return invalid(
                "input",
                format!("got {height}x{width}x{channels}; all must be >= 1"),
            );
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return invalid(
                "dropout",
                format!("got {}, expected 0 <= p < 1", self.dropout),
            );
        }
        if let Transition::Classic { compression } = self.transition {
            if !(compression > 0.0 && compression <= 1.0) {
                return invalid(
                    "transition.compression",
                    format!("got {compression}, expected 0 < c <= 1 (DenseNet-BC uses 0.5)"),
                );
            }
        }
        if let Template::LogLogDenseNet { hub_multiplier, .. } = self.template {
            if hub_multiplier == 0 {
                return invalid("template.hub_multiplier", "must be at least 1".into());
            }
        }
        if let Task::Segmentation { .. } = self.task {
            if self.blocks.len() % 2 != 1 || self.blocks.len() < 3 {
                return invalid(
                    "blocks",
                    format!(
                        "a segmentation network needs an odd number of blocks (down path, \
                         bottleneck, up path), at least 3; got {}",
                        self.blocks.len()
                    ),
                );
            }
        }
        self.validate_resolution()
    }

    /// Checks that every downsampling step still has at least one pixel, and for
    /// segmentation that the up path can return to the input size.
    fn validate_resolution(&self) -> Result<()> {
        let stem_factor = match self.stem {
            Stem::ImageNet => 4,
            Stem::Cifar | Stem::Plain => 1,
        };
        let downsamples = match self.task {
            Task::Classification => self.blocks.len() - 1,
            Task::Segmentation { .. } => self.blocks.len() / 2,
        };
        let factor = stem_factor << downsamples;
        let (h, w) = (self.input.height, self.input.width);
        if h < factor || w < factor {
            return Err(Error::InvalidSpec {
                field: "blocks".into(),
                message: format!(
                    "{} blocks with the {:?} stem downsample by {factor}, but the input is only \
                     {h}x{w}; use fewer blocks or a larger input",
                    self.blocks.len(),
                    self.stem
                ),
            });
        }
        Ok(())
    }
}

/// Chooses the hint printed under a RON syntax error. An unknown variant gets
/// the variants of its own enum, with the fields that they take.
fn syntax_hint(code: &ron::error::Error) -> String {
    if let ron::error::Error::NoSuchEnumVariant {
        outer: Some(name), ..
    } = code
    {
        return match name.as_str() {
            "Template" => format!("templates are {TEMPLATE_NAMES}"),
            "LrSchedule" => {
                "schedules are Step, Cosine, Constant, Exponential(decay: 0.995)".into()
            }
            "Optimizer" => "optimizers are Sgd, RmsProp(decay: 0.9, eps: 1e-6)".into(),
            "Transition" => {
                "transitions are Independent, BlockCompression, Classic(compression: 0.5)".into()
            }
            "Task" => "tasks are Classification, Segmentation(ignore_label: Some(11), \
                       first_block_skip: true)"
                .into(),
            other => format!("variant names of `{other}` are case-sensitive"),
        };
    }
    let message = code.to_string();
    if message.contains("Unexpected missing field") || message.contains("missing field") {
        "add the field; `blocks` and `growth` have no default".into()
    } else if message.contains("Unknown field") || message.contains("unknown field") {
        "check the spelling against the README's field list".into()
    } else if message.contains("variant") {
        format!("templates are {TEMPLATE_NAMES}")
    } else {
        "a network file is one `NetSpec(...)` or `(...)` struct of `field: value` pairs".into()
    }
}

/// Converts a RON value to JSON in the shape that serde_json gives for the same Rust
/// value: bare identifiers become strings (unit enum variants), `Name(k: v)` becomes
/// `{"Name": {"k": v}}` (struct variants), `(k: v)` an object.
fn ron_text_to_json(text: &str) -> std::result::Result<serde_json::Value, String> {
    let mut parser = ValueParser {
        chars: text.chars().collect(),
        pos: 0,
    };
    let value = parser.value()?;
    parser.skip_ws();
    if parser.pos != parser.chars.len() {
        return Err(format!(
            "unexpected text at column {} of `{text}`",
            parser.pos + 1
        ));
    }
    Ok(value)
}

/// A small recursive-descent reader for override values, which are short RON values.
struct ValueParser {
    chars: Vec<char>,
    pos: usize,
}

impl ValueParser {
    fn skip_ws(&mut self) {
        while self.pos < self.chars.len() && self.chars[self.pos].is_whitespace() {
            self.pos += 1;
        }
    }

    fn peek(&mut self) -> Option<char> {
        self.skip_ws();
        self.chars.get(self.pos).copied()
    }

    fn expect(&mut self, c: char) -> std::result::Result<(), String> {
        if self.peek() == Some(c) {
            self.pos += 1;
            Ok(())
        } else {
            Err(format!("expected `{c}` at column {}", self.pos + 1))
        }
    }

    fn value(&mut self) -> std::result::Result<serde_json::Value, String> {
        match self.peek() {
            None => Err("missing value after `=`".into()),
            Some('[') => {
                self.pos += 1;
                let mut items = Vec::new();
                while self.peek() != Some(']') {
                    items.push(self.value()?);
                    if self.peek() == Some(',') {
                        self.pos += 1;
                    } else {
                        break;
                    }
                }
                self.expect(']')?;
                Ok(serde_json::Value::Array(items))
            }
            Some('(') => self.fields(),
            Some('"') => {
                self.pos += 1;
                let start = self.pos;
                while self.pos < self.chars.len() && self.chars[self.pos] != '"' {
                    self.pos += 1;
                }
                let s: String = self.chars[start..self.pos].iter().collect();
                self.expect('"')?;
                Ok(serde_json::Value::String(s))
            }
            Some(c) if c.is_ascii_digit() || c == '-' || c == '+' || c == '.' => {
                let start = self.pos;
                while self.pos < self.chars.len()
                    && (self.chars[self.pos].is_ascii_alphanumeric()
                        || "+-._".contains(self.chars[self.pos]))
                {
                    self.pos += 1;
                }
                let s: String = self.chars[start..self.pos].iter().collect();
                let s = s.replace('_', "");
                if let Ok(i) = s.parse::<i64>() {
                    Ok(i.into())
                } else if let Ok(f) = s.parse::<f64>() {
                    Ok(serde_json::json!(f))
                } else {
                    Err(format!("`{s}` is not a number"))
                }
            }
            Some(c) if c.is_alphabetic() || c == '_' => {
                let start = self.pos;
                while self.pos < self.chars.len()
                    && (self.chars[self.pos].is_alphanumeric() || self.chars[self.pos] == '_')
                {
                    self.pos += 1;
                }
                let ident: String = self.chars[start..self.pos].iter().collect();
                match ident.as_str() {
                    "true" => return Ok(true.into()),
                    "false" => return Ok(false.into()),
                    "None" => return Ok(serde_json::Value::Null),
                    "Some" => {
                        self.expect('(')?;
                        let inner = self.value()?;
                        self.expect(')')?;
                        return Ok(inner);
                    }
                    _ => {}
                }
                if self.peek() == Some('(') {
                    let inner = self.fields()?;
                    let mut map = serde_json::Map::new();
                    map.insert(ident, inner);
                    Ok(serde_json::Value::Object(map))
                } else {
                    Ok(serde_json::Value::String(ident))
                }
            }
            Some(c) => Err(format!("unexpected `{c}` at column {}", self.pos + 1)),
        }
    }

    /// `(k: v, ...)` as an object, `(v, ...)` as an array.
    fn fields(&mut self) -> std::result::Result<serde_json::Value, String> {
        self.expect('(')?;
        let mut map = serde_json::Map::new();
        let mut items = Vec::new();
        while self.peek() != Some(')') {
            let save = self.pos;
            let key = self.identifier();
            if key.is_some() && self.peek() == Some(':') {
                self.pos += 1;
                map.insert(key.unwrap_or_default(), self.value()?);
            } else {
                self.pos = save;
                items.push(self.value()?);
            }
            if self.peek() == Some(',') {
                self.pos += 1;
            } else {
                break;
            }
        }
        self.expect(')')?;
        if items.is_empty() {
            Ok(serde_json::Value::Object(map))
        } else {
            Ok(serde_json::Value::Array(items))
        }
    }

    fn identifier(&mut self) -> Option<String> {
        self.skip_ws();
        let start = self.pos;
        while self.pos < self.chars.len()
            && (self.chars[self.pos].is_alphanumeric() || self.chars[self.pos] == '_')
        {
            self.pos += 1;
        }
        (self.pos > start && !self.chars[start].is_ascii_digit())
            .then(|| self.chars[start..self.pos].iter().collect())
    }
}

/// Replaces the value at a dotted `path`. A path step that names a field of an enum
/// variant (`template.min_inputs`) descends through the variant's name.
fn set_path(
    root: &mut serde_json::Value,
    path: &str,
    value: serde_json::Value,
) -> std::result::Result<(), String> {
    let steps: Vec<&str> = path.split('.').collect();
    let mut node = root;
    for (depth, step) in steps.iter().enumerate() {
        let last = depth + 1 == steps.len();
        let here = steps[..depth].join(".");
        let object = match node {
            serde_json::Value::Object(map) => map,
            other => {
                return Err(format!(
                    "`{here}` is {}, which has no field `{step}`",
                    describe(other)
                ))
            }
        };
        // Descend through an externally tagged enum variant, e.g. {"Classic": {...}}.
        let through_variant = !object.contains_key(*step)
            && object.len() == 1
            && object.iter().next().is_some_and(|(tag, inner)| {
                tag.chars().next().is_some_and(char::is_uppercase) && inner.is_object()
            });
        let object = if through_variant {
            let inner = object.values_mut().next().expect("one entry");
            inner.as_object_mut().expect("checked to be an object")
        } else {
            object
        };
        if !object.contains_key(*step) {
            let mut allowed: Vec<&String> = object.keys().collect();
            allowed.sort();
            let allowed: Vec<&str> = allowed.iter().map(|s| s.as_str()).collect();
            let at = if here.is_empty() { "the spec" } else { &here };
            return Err(format!(
                "`{step}` is not a field of {at}; allowed: {}",
                allowed.join(", ")
            ));
        }
        if last {
            object.insert(step.to_string(), value);
            return Ok(());
        }
        node = object.get_mut(*step).expect("checked above");
    }
    Err("empty path".into())
}

fn describe(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Null => "None".into(),
        serde_json::Value::String(s) => format!("the variant `{s}`"),
        other => format!("the value `{other}`"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: &str = "(blocks: [4, 4], growth: 8)";

    #[test]
    fn short_file_gets_defaults() {
        let spec = NetSpec::from_ron(SMALL, "small.ron").unwrap();
        assert_eq!(spec.template, Template::LogDenseNet);
        assert_eq!(spec.bottleneck, Some(4));
        assert_eq!(spec.x0_channels(), 16);
        spec.validate().unwrap();
    }

    #[test]
    fn syntax_error_has_line_and_column() {
        let err = NetSpec::from_ron("(\n  blocks: [4, 4],\n  growth: ,\n)", "bad.ron").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("bad.ron:3:"), "{text}");
    }

    #[test]
    fn unknown_field_is_rejected() {
        let err = NetSpec::from_ron("(blocks: [4], growth: 8, grwth: 3)", "f.ron").unwrap_err();
        assert!(err.to_string().contains("grwth"), "{err}");
    }

    #[test]
    fn overrides_set_nested_and_variant_fields() {
        let spec = NetSpec::from_ron(SMALL, "small.ron").unwrap();
        let spec = spec
            .with_overrides(&[
                "blocks=[32,32,32]".into(),
                "growth=16".into(),
                "template=LogLogDenseNet(min_inputs: 4)".into(),
                "template.hub_multiplier=3".into(),
                "train.lr=0.05".into(),
                "bottleneck=None".into(),
                "transition=Classic(compression: 0.5)".into(),
            ])
            .unwrap();
        assert_eq!(spec.blocks, vec![32, 32, 32]);
        assert_eq!(spec.growth, 16);
        assert_eq!(
            spec.template,
            Template::LogLogDenseNet {
                min_inputs: 4,
                hub_multiplier: 3
            }
        );
        assert_eq!(spec.train.lr, 0.05);
        assert_eq!(spec.bottleneck, None);
        assert_eq!(spec.transition, Transition::Classic { compression: 0.5 });
    }

    #[test]
    fn override_of_missing_path_lists_fields() {
        let spec = NetSpec::from_ron(SMALL, "small.ron").unwrap();
        let err = spec.with_overrides(&["grwth=3".into()]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("grwth"), "{text}");
        assert!(text.contains("growth"), "{text}");
    }

    #[test]
    fn validation_names_field() {
        let mut spec = NetSpec::from_ron(SMALL, "small.ron").unwrap();
        spec.growth = 0;
        assert!(spec.validate().unwrap_err().to_string().contains("growth"));
        spec.growth = 8;
        spec.blocks = vec![4; 7];
        assert!(spec.validate().unwrap_err().to_string().contains("32x32"));
    }

    #[test]
    fn unknown_variant_hint_fits_enum() {
        let cases = [
            ("template: LogDense", "templates are DenseNet"),
            ("train: (schedule: Cosin)", "schedules are Step"),
            ("train: (optimizer: Adam)", "optimizers are Sgd"),
            ("transition: Classik()", "Classic(compression: 0.5)"),
            ("stem: Cifar10", "variant names of `Stem`"),
        ];
        for (field, hint) in cases {
            let text = format!("(blocks: [4, 4], growth: 8, {field})");
            let err = NetSpec::from_ron(&text, "f.ron").unwrap_err().to_string();
            assert!(err.contains(hint), "{field}: {err}");
            if !hint.starts_with("templates") {
                assert!(!err.contains("templates are"), "{field}: {err}");
            }
        }
    }

    #[test]
    fn zero_batch_or_epochs_rejected() {
        let spec = NetSpec::from_ron(SMALL, "small.ron").unwrap();
        let validate = |item: &str| spec.with_overrides(&[item.into()]).unwrap().validate();
        let batch = validate("train.batch=0").unwrap_err();
        assert!(batch.to_string().contains("`train.batch`"), "{batch}");
        let epochs = validate("train.epochs=0").unwrap_err();
        assert!(epochs.to_string().contains("`train.epochs`"), "{epochs}");
        assert!(validate("train.batch=1").is_ok());
        assert!(validate("train.epochs=1").is_ok());
    }

    #[test]
    fn optimizer_and_schedule_parse_and_validate() {
        let spec = NetSpec::from_ron(
            "(blocks: [4, 4], growth: 8, train: (optimizer: RmsProp(), \
             schedule: Exponential(decay: 0.995)))",
            "rmsprop.ron",
        )
        .unwrap();
        assert_eq!(
            spec.train.optimizer,
            Optimizer::RmsProp {
                decay: 0.9,
                eps: 1e-6
            }
        );
        assert_eq!(
            spec.train.schedule,
            LrSchedule::Exponential { decay: 0.995 }
        );
        spec.validate().unwrap();
        assert_eq!(TrainSpec::default().optimizer, Optimizer::Sgd);

        let bad_decay = spec
            .with_overrides(&["train.optimizer.decay=1.0".into()])
            .unwrap();
        let message = bad_decay.validate().unwrap_err().to_string();
        assert!(message.contains("train.optimizer.decay"), "{message}");
        let bad_eps = spec
            .with_overrides(&["train.optimizer.eps=0.0".into()])
            .unwrap();
        let message = bad_eps.validate().unwrap_err().to_string();
        assert!(message.contains("train.optimizer.eps"), "{message}");
        let bad_schedule = spec
            .with_overrides(&["train.schedule=Exponential(decay: 1.5)".into()])
            .unwrap();
        let message = bad_schedule.validate().unwrap_err().to_string();
        assert!(message.contains("train.schedule.decay"), "{message}");
    }
}
