//! Training curves: loss (left panel) and accuracy (right panel) over epochs,
//! for the training set and, where recorded, the test set.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::{draw_error, render, Figure, PlotError, FONT};

/// Metrics at one point of training; `epoch` may be fractional for points taken
/// inside an epoch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CurvePoint {
    pub epoch: f64,
    pub train_loss: f64,
    pub train_acc: Option<f64>,
    pub test_loss: Option<f64>,
    pub test_acc: Option<f64>,
}

/// Draws loss and accuracy curves to `path` (`.png` or `.svg`). Non-finite values
/// are left out of the curves.
pub fn training_curves(rows: &[CurvePoint], path: &Path) -> Result<(), PlotError> {
    if !rows
        .iter()
        .any(|r| r.epoch.is_finite() && r.train_loss.is_finite())
    {
        return Err(PlotError::Empty {
            what: format!(
                "training curves from {} rows without a finite loss",
                rows.len()
            ),
        });
    }
    render(path, &Curves { rows })
}

struct Curves<'a> {
    rows: &'a [CurvePoint],
}

/// One named line of a panel.
struct Series {
    label: &'static str,
    color: RGBColor,
    points: Vec<(f64, f64)>,
}

const TRAIN_COLOR: RGBColor = RGBColor(31, 119, 180);
const TEST_COLOR: RGBColor = RGBColor(214, 39, 40);

impl Curves<'_> {
    fn series(
        &self,
        label: &'static str,
        color: RGBColor,
        value: impl Fn(&CurvePoint) -> Option<f64>,
    ) -> Series {
        let points = self
            .rows
            .iter()
            .filter_map(|r| value(r).map(|v| (r.epoch, v)))
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect();
        Series {
            label,
            color,
            points,
        }
    }
}

impl Figure for Curves<'_> {
    fn size(&self) -> (u32, u32) {
        (1200, 480)
    }

    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
        path: &Path,
    ) -> Result<(), PlotError> {
        let loss = [
            self.series("train loss", TRAIN_COLOR, |r| Some(r.train_loss)),
            self.series("test loss", TEST_COLOR, |r| r.test_loss),
        ];
        let accuracy = [
            self.series("train accuracy", TRAIN_COLOR, |r| r.train_acc),
            self.series("test accuracy", TEST_COLOR, |r| r.test_acc),
        ];
        let (left, right) = root.split_horizontally(root.dim_in_pixel().0 / 2);
        // Loss falls and accuracy rises, so each legend goes where its curves
        // usually are not.
        panel(
            &left,
            "Loss",
            "loss",
            &loss,
            SeriesLabelPosition::UpperRight,
            path,
        )?;
        let lower = SeriesLabelPosition::LowerRight;
        panel(&right, "Accuracy", "accuracy", &accuracy, lower, path)
    }
}

/// Computes x and y ranges that cover every point with a 5 % margin, or
/// `(0..1, 0..1)` when there are no points.
fn bounds(series: &[Series]) -> (std::ops::Range<f64>, std::ops::Range<f64>) {
    let points = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        return (0.0..1.0, 0.0..1.0);
    }
    let pad = |lo: f64, hi: f64| {
        let margin = if hi > lo { 0.05 * (hi - lo) } else { 0.5 };
        (lo - margin)..(hi + margin)
    };
    // Start the y axis at 0 for non-negative data whose minimum is within one
    // data span of 0, so that losses and accuracies are not magnified.
    let y_low = if y0 >= 0.0 && y0 <= y1 - y0 { 0.0 } else { y0 };
    (pad(x0, x1), pad(y_low, y1))
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    y_desc: &str,
    series: &[Series],
    legend: SeriesLabelPosition,
    path: &Path,
) -> Result<(), PlotError> {
    let (x_range, y_range) = bounds(series);
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x_range, y_range)
        .map_err(|e| draw_error(path, e))?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc(y_desc)
        .label_style((FONT, 13))
        .draw()
        .map_err(|e| draw_error(path, e))?;

    let mut drawn = 0;
    for s in series.iter().filter(|s| !s.points.is_empty()) {
        let color = s.color;
        chart
            .draw_series(LineSeries::new(
                s.points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(|e| draw_error(path, e))?
            .label(s.label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        drawn += 1;
    }
    if drawn == 0 {
        let note = Text::new("not recorded", (90, 60), (FONT, 15).into_font());
        area.draw(&note).map_err(|e| draw_error(path, e))?;
        return Ok(());
    }
    chart
        .configure_series_labels()
        .position(legend)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font((FONT, 13))
        .draw()
        .map_err(|e| draw_error(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plot::tests::{check_png, check_svg};

    fn rows() -> Vec<CurvePoint> {
        (0..=20)
            .map(|e| {
                let epoch = e as f64;
                CurvePoint {
                    epoch,
                    train_loss: 2.3 * (-epoch / 6.0).exp() + 0.1,
                    train_acc: Some(1.0 - 0.9 * (-epoch / 5.0).exp()),
                    test_loss: (e % 2 == 0).then(|| 2.3 * (-epoch / 7.0).exp() + 0.3),
                    test_acc: (e % 2 == 0).then(|| 0.95 - 0.85 * (-epoch / 6.0).exp()),
                }
            })
            .collect()
    }

    #[test]
    fn curves_png_and_svg() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let png = dir.path().join("curves.png");
        training_curves(&rows(), &png).expect("the PNG is written");
        assert_eq!(check_png(&png), (1200, 480));
        let svg = dir.path().join("curves.svg");
        training_curves(&rows(), &svg).expect("the SVG is written");
        let text = check_svg(&svg);
        assert!(
            text.contains("test accuracy"),
            "the legend names the test curve"
        );
    }

    #[test]
    fn curves_without_accuracy() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let rows: Vec<CurvePoint> = rows()
            .into_iter()
            .map(|r| CurvePoint {
                train_acc: None,
                test_acc: None,
                test_loss: None,
                ..r
            })
            .collect();
        let svg = dir.path().join("loss-only.svg");
        training_curves(&rows, &svg).expect("the SVG is written");
        assert!(check_svg(&svg).contains("not recorded"));
    }

    #[test]
    fn curves_reject_empty_rows() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let err = training_curves(&[], &dir.path().join("empty.png")).unwrap_err();
        assert!(matches!(err, PlotError::Empty { .. }), "{err}");
        let nan = CurvePoint {
            epoch: 1.0,
            train_loss: f64::NAN,
            train_acc: None,
            test_loss: None,
            test_acc: None,
        };
        let err = training_curves(&[nan], &dir.path().join("nan.png")).unwrap_err();
        assert!(matches!(err, PlotError::Empty { .. }), "{err}");
    }

    #[test]
    fn curves_reject_unknown_extension() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let err = training_curves(&rows(), &dir.path().join("curves.jpg")).unwrap_err();
        assert!(err.to_string().contains("\"jpg\""), "{err}");
    }
}
