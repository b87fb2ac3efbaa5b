//! Plots: the connection matrix of a feature-layer graph and training curves,
//! written as PNG or SVG according to the file extension.
//!
//! PNG text is rasterised with DejaVu Sans, embedded in the binary and
//! registered with plotters' ab_glyph backend on first use, so plotting needs no
//! system fonts. SVG output keeps text as `<text>` elements.

mod curves;
mod matrix;

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;

pub use curves::{training_curves, CurvePoint};
pub use matrix::connection_matrix;

/// Errors of the plotting functions.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("cannot plot to {path}: unsupported extension {extension:?}, expected .png or .svg")]
    UnsupportedFormat { path: String, extension: String },
    /// An output file that cannot be created, with the OS error as `reason`.
    #[error("cannot create {path}: {reason}; check that its folder exists and is writable")]
    Create {
        path: String,
        reason: std::io::Error,
    },
    #[error("cannot plot to {path}: {message}")]
    Draw { path: String, message: String },
    #[error("cannot plot {what}: there is nothing to draw")]
    Empty { what: String },
    #[error("the embedded font DejaVu Sans failed to load")]
    Font,
}

/// DejaVu Sans (Bitstream Vera licence, see `assets/DEJAVU-LICENSE`).
static DEJAVU_SANS: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");

/// Font family name under which DejaVu Sans is registered.
pub(crate) const FONT: &str = "sans-serif";

fn register_font() -> Result<(), PlotError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, DEJAVU_SANS).is_ok()
    });
    if *ok {
        Ok(())
    } else {
        Err(PlotError::Font)
    }
}

/// Output format chosen by the file extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Png,
    Svg,
}

fn format_of(path: &Path) -> Result<Format, PlotError> {
    let extension = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    match extension.as_str() {
        "png" => Ok(Format::Png),
        "svg" => Ok(Format::Svg),
        _ => Err(PlotError::UnsupportedFormat {
            path: path.display().to_string(),
            extension,
        }),
    }
}

/// Converts a plotters error into a `PlotError` naming the output file.
pub(crate) fn draw_error(path: &Path, error: impl std::fmt::Display) -> PlotError {
    PlotError::Draw {
        path: path.display().to_string(),
        message: error.to_string(),
    }
}

/// A figure that can draw itself on any plotters backend.
pub(crate) trait Figure {
    /// Size of the image in pixels.
    fn size(&self) -> (u32, u32);

    /// Draws onto `root`; `path` names the output in errors.
    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
        path: &Path,
    ) -> Result<(), PlotError>;
}

/// Draws `figure` with the backend that the extension of `path` selects and
/// writes the file.
pub(crate) fn render(path: &Path, figure: &impl Figure) -> Result<(), PlotError> {
    let size = figure.size();
    let format = format_of(path)?;
    // Creating the file here reports a missing folder or a permission problem
    // with the OS reason. The PNG encoder or the SVG backend then overwrites
    // the empty file.
    std::fs::File::create(path).map_err(|reason| PlotError::Create {
        path: path.display().to_string(),
        reason,
    })?;
    match format {
        Format::Png => {
            register_font()?;
            // plotters draws into an RGB buffer, and `image` encodes it, so
            // plotters needs no image encoder of its own.
            let (width, height) = size;
            let mut pixels = vec![0u8; 3 * width as usize * height as usize];
            {
                let root = BitMapBackend::with_buffer(&mut pixels, size).into_drawing_area();
                root.fill(&WHITE).map_err(|e| draw_error(path, e))?;
                figure.draw(&root, path)?;
                root.present().map_err(|e| draw_error(path, e))?;
            }

            let image = image::RgbImage::from_raw(width, height, pixels)
                .expect("the buffer contains 3 bytes for each of width * height pixels");
            image
                .save_with_format(path, image::ImageFormat::Png)
                .map_err(|e| draw_error(path, e))
        }
        Format::Svg => {
            let root = SVGBackend::new(path, size).into_drawing_area();
            root.fill(&WHITE).map_err(|e| draw_error(path, e))?;
            figure.draw(&root, path)?;
            root.present().map_err(|e| draw_error(path, e))
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::Read;
    use std::path::Path;

    /// Checks the PNG signature, decompresses the image data and checks its length
    /// against the header; returns `(width, height)`.
    pub(crate) fn check_png(path: &Path) -> (u32, u32) {
        let bytes = std::fs::read(path).expect("the PNG exists");
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
        assert_eq!(&bytes[12..16], b"IHDR", "first chunk");
        let be = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let (width, height) = (be(16), be(20));
        let (depth, color) = (bytes[24], bytes[25]);
        assert_eq!(depth, 8, "bits per sample");
        let channels = match color {
            2 => 3,
            6 => 4,
            other => panic!("unexpected PNG colour type {other}"),
        };

        let mut data = Vec::new();
        let mut at = 8;
        while at + 8 <= bytes.len() {
            let len = be(at) as usize;
            let kind = &bytes[at + 4..at + 8];
            if kind == b"IDAT" {
                data.extend_from_slice(&bytes[at + 8..at + 8 + len]);
            }
            at += 12 + len;
        }
        let mut pixels = Vec::new();
        flate2::read::ZlibDecoder::new(&data[..])
            .read_to_end(&mut pixels)
            .expect("the image data inflates");
        // One filter byte per row, then the samples.
        let expected = height as usize * (1 + width as usize * channels);
        assert_eq!(pixels.len(), expected, "decoded size of {width}x{height}");
        (width, height)
    }

    /// Checks that the file is one `<svg>` element and returns its text.
    pub(crate) fn check_svg(path: &Path) -> String {
        let text = std::fs::read_to_string(path).expect("the SVG exists");
        let body = text.trim_start();
        let body = match body.strip_prefix("<?xml") {
            Some(rest) => rest
                .split_once("?>")
                .expect("a closed declaration")
                .1
                .trim_start(),
            None => body,
        };
        assert!(
            body.starts_with("<svg"),
            "root element: {}",
            &body[..40.min(body.len())]
        );
        assert!(text.trim_end().ends_with("</svg>"), "closing tag");
        text
    }

    #[test]
    fn unknown_extension_names_it() {
        let err = super::format_of(Path::new("out/plot.pdf")).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("\"pdf\""), "{text}");
        assert!(text.contains("out/plot.pdf"), "{text}");
    }
}
