//! Contact sheets: a grid of dataset images, each with its class index drawn
//! underneath in a 3x5 bitmap digit font, written as an RGB image.

use image::{Rgb, RgbImage};

use super::Split;

/// Width of one glyph of the digit font, in font pixels.
pub const DIGIT_WIDTH: u32 = 3;
/// Height of one glyph of the digit font, in font pixels.
pub const DIGIT_HEIGHT: u32 = 5;

/// The digits 0 to 9, one row of 3 bits per line, most significant bit on the left.
const GLYPHS: [[u8; 5]; 10] = [
    [0b111, 0b101, 0b101, 0b101, 0b111],
    [0b010, 0b110, 0b010, 0b010, 0b111],
    [0b111, 0b001, 0b111, 0b100, 0b111],
    [0b111, 0b001, 0b111, 0b001, 0b111],
    [0b101, 0b101, 0b111, 0b001, 0b001],
    [0b111, 0b100, 0b111, 0b001, 0b111],
    [0b111, 0b100, 0b111, 0b101, 0b111],
    [0b111, 0b001, 0b010, 0b010, 0b010],
    [0b111, 0b101, 0b111, 0b101, 0b111],
    [0b111, 0b101, 0b111, 0b001, 0b111],
];

/// Draws `number` with its top-left corner at (`x`, `y`), each font pixel a
/// `scale` x `scale` square, one font pixel between digits. Pixels outside
/// the canvas are skipped.
pub fn draw_number(canvas: &mut RgbImage, number: u32, x: u32, y: u32, scale: u32, color: Rgb<u8>) {
    let text = number.to_string();
    for (position, digit) in text.bytes().enumerate() {
        let glyph = GLYPHS[(digit - b'0') as usize];
        let left = x + position as u32 * (DIGIT_WIDTH + 1) * scale;
        for (row, bits) in glyph.iter().enumerate() {
            for column in 0..DIGIT_WIDTH {
                if bits & (1 << (DIGIT_WIDTH - 1 - column)) == 0 {
                    continue;
                }
                for dy in 0..scale {
                    for dx in 0..scale {
                        let (px, py) = (left + column * scale + dx, y + row as u32 * scale + dy);
                        if px < canvas.width() && py < canvas.height() {
                            canvas.put_pixel(px, py, color);
                        }
                    }
                }
            }
        }
    }
}

/// Lays out the images `indices` of `split` in rows of `columns`, each
/// enlarged `scale` times (nearest neighbour) above its class index.
pub fn contact_sheet(split: &Split, indices: &[usize], columns: usize, scale: u32) -> RgbImage {
    let scale = scale.max(1);
    let columns = columns.clamp(1, indices.len().max(1)) as u32;
    let rows = indices.len().div_ceil(columns as usize).max(1) as u32;
    let font_scale = scale.div_ceil(2);
    let margin = 2 * font_scale;
    let tile_w = split.width as u32 * scale + margin;
    let tile_h = split.height as u32 * scale + DIGIT_HEIGHT * font_scale + 2 * margin;
    let mut canvas = RgbImage::from_pixel(
        columns * tile_w + margin,
        rows * tile_h + margin,
        Rgb([40, 40, 40]),
    );

    for (slot, &index) in indices.iter().enumerate() {
        let left = margin + (slot as u32 % columns) * tile_w;
        let top = margin + (slot as u32 / columns) * tile_h;
        let pixels = split.image(index);
        for y in 0..split.height as u32 * scale {
            for x in 0..split.width as u32 * scale {
                let offset =
                    ((y / scale) as usize * split.width + (x / scale) as usize) * split.channels;
                let color = match split.channels {
                    1 => Rgb([pixels[offset]; 3]),
                    _ => Rgb([pixels[offset], pixels[offset + 1], pixels[offset + 2]]),
                };
                canvas.put_pixel(left + x, top + y, color);
            }
        }
        if !split.is_segmentation() {
            let label_top = top + split.height as u32 * scale + margin / 2;
            draw_number(
                &mut canvas,
                split.labels[index],
                left,
                label_top,
                font_scale,
                Rgb([255, 220, 0]),
            );
        }
    }
    canvas
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_one_as_a_column() {
        let mut canvas = RgbImage::new(3, 5);
        draw_number(&mut canvas, 1, 0, 0, 1, Rgb([255, 255, 255]));
        let lit: Vec<u8> = (0..5).map(|y| canvas.get_pixel(1, y)[0]).collect();
        assert_eq!(lit, vec![255; 5], "the middle column of 1 is lit");
        assert_eq!(canvas.get_pixel(0, 0)[0], 0);
        assert_eq!(canvas.get_pixel(0, 1)[0], 255);
    }

    #[test]
    fn sheet_has_one_tile_per_image() {
        let split = Split {
            images: vec![200; 3 * 4],
            labels: vec![0, 1, 2],
            height: 2,
            width: 2,
            channels: 1,
            len: 3,
        };
        let sheet = contact_sheet(&split, &[0, 1, 2], 2, 4);
        // Scale 4 gives a font scale of 2 and a margin of 4 around 8x8 tiles.
        assert_eq!(sheet.width(), 4 + 2 * (8 + 4));
        assert_eq!(sheet.get_pixel(4, 4), &Rgb([200, 200, 200]));
        assert_eq!(sheet.get_pixel(3, 3), &Rgb([40, 40, 40]));
    }
}
