//! Dataset readers against fixtures written in each official format: CIFAR
//! binary and python batches (folder and `.tar.gz`), SVHN MAT v5 files,
//! Fashion-MNIST IDX, ILSVRC2012 folders with odd JPEGs, CamVid's SegNet
//! layout, plus augmentation determinism, the bundled subset and the
//! `ldnc data inspect` command.

#[path = "../src/cli_data.rs"]
mod cli_data;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use flate2::write::GzEncoder;
use flate2::Compression;
use image::{GrayImage, Luma, Rgb, RgbImage};
use ldnc_runtime::data::mat::{self, MatArray, MatData};
use ldnc_runtime::data::pickle::write as pk;
use ldnc_runtime::data::{
    self, decode_image_file, encode_idx, read_idx, Augment, BatchConfig, Batcher, DataError,
    DataSpec, Normalization, Prefetcher, Source,
};

const CIFAR_IMAGE: usize = 3072;

/// Planar CIFAR pixels for record `record` of file `file`.
fn cifar_planar(file: usize, record: usize) -> Vec<u8> {
    (0..CIFAR_IMAGE)
        .map(|o| ((file * 7 + record * 13 + o) % 251) as u8)
        .collect()
}

/// Checks that `hwc` is the HWC form of `planar`.
fn assert_hwc_matches(hwc: &[u8], planar: &[u8], what: &str) {
    for p in 0..1024 {
        for c in 0..3 {
            assert_eq!(
                hwc[p * 3 + c],
                planar[c * 1024 + p],
                "{what}: pixel {p} channel {c}"
            );
        }
    }
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().expect("fixture paths have a parent")).expect("mkdir");
    std::fs::write(path, bytes).expect("write fixture");
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
    encoder.write_all(bytes).expect("gzip to memory");
    encoder.finish().expect("gzip to memory")
}

fn tar_gz(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
    for (name, bytes) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header, name, bytes.as_slice())
            .expect("tar entry");
    }
    builder
        .into_inner()
        .expect("finish tar")
        .finish()
        .expect("finish gzip")
}

// ---------------------------------------------------------------- CIFAR

/// CIFAR-10 binary batch: 2 records, labels `file` and `9 - file`.
fn cifar10_binary_batch(file: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for (record, label) in [file as u8, 9 - file as u8].into_iter().enumerate() {
        out.push(label);
        out.extend_from_slice(&cifar_planar(file, record));
    }
    out
}

/// A pickled python batch with labels under each of `keys`.
fn cifar_python_batch(file: usize, keys: &[(&str, [u32; 2])]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut memo = 1;
    pk::header(&mut out);
    out.extend_from_slice(b"}q\x00(");
    pk::bytes(&mut out, b"batch_label");
    pk::bytes(&mut out, format!("training batch {file}").as_bytes());
    for (key, labels) in keys {
        pk::bytes(&mut out, key.as_bytes());
        pk::int_list(&mut out, labels, &mut memo);
    }
    pk::bytes(&mut out, b"data");
    let data = [cifar_planar(file, 0), cifar_planar(file, 1)].concat();
    pk::ndarray_u8(&mut out, &[2, CIFAR_IMAGE], &data, &mut memo);
    out.extend_from_slice(b"u.");
    out
}

const CIFAR10_BINARY: [&str; 6] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
    "test_batch.bin",
];

fn check_cifar10(dataset: &data::Dataset) {
    assert_eq!(dataset.train.len, 10);
    assert_eq!(dataset.test.len, 2);
    assert_eq!(dataset.classes, 10);
    assert_eq!(dataset.class_names[3], "cat");
    for file in 0..5 {
        for record in 0..2 {
            let index = file * 2 + record;
            let expected_label = if record == 0 { file } else { 9 - file };
            assert_eq!(
                dataset.train.labels[index], expected_label as u32,
                "train label {index}"
            );
            let what = format!("train image {index}");
            assert_hwc_matches(
                dataset.train.image(index),
                &cifar_planar(file, record),
                &what,
            );
        }
    }
    assert_eq!(dataset.test.labels, vec![5, 4]);
    assert_hwc_matches(dataset.test.image(1), &cifar_planar(5, 1), "test image 1");
}

#[test]
fn cifar10_binary_folder() {
    let dir = tempfile::tempdir().expect("temp dir");
    for (file, name) in CIFAR10_BINARY.iter().enumerate() {
        write(
            &dir.path().join("cifar-10-batches-bin").join(name),
            &cifar10_binary_batch(file),
        );
    }
    let spec = DataSpec::parse(&format!("cifar10:{}", dir.path().display())).expect("spec");
    check_cifar10(&data::load(&spec).expect("load binary folder"));
}

#[test]
fn cifar10_binary_tar_gz() {
    let dir = tempfile::tempdir().expect("temp dir");
    let files: Vec<(String, Vec<u8>)> = CIFAR10_BINARY
        .iter()
        .enumerate()
        .map(|(file, name)| {
            (
                format!("cifar-10-batches-bin/{name}"),
                cifar10_binary_batch(file),
            )
        })
        .collect();
    let archive = dir.path().join("cifar-10-binary.tar.gz");
    write(&archive, &tar_gz(&files));

    check_cifar10(&data::load_cifar10(&archive).expect("load the archive itself"));
    check_cifar10(&data::load_cifar10(dir.path()).expect("load the folder with the archive"));
}

#[test]
fn cifar10_python_folder_and_tar_gz() {
    let dir = tempfile::tempdir().expect("temp dir");
    let names = [
        "data_batch_1",
        "data_batch_2",
        "data_batch_3",
        "data_batch_4",
        "data_batch_5",
        "test_batch",
    ];
    let files: Vec<(String, Vec<u8>)> = names
        .iter()
        .enumerate()
        .map(|(file, name)| {
            let labels = [file as u32, 9 - file as u32];
            (
                format!("cifar-10-batches-py/{name}"),
                cifar_python_batch(file, &[("labels", labels)]),
            )
        })
        .collect();
    for (name, bytes) in &files {
        write(&dir.path().join("extracted").join(name), bytes);
    }
    write(&dir.path().join("cifar-10-python.tar.gz"), &tar_gz(&files));

    check_cifar10(&data::load_cifar10(&dir.path().join("extracted")).expect("python folder"));
    let archive = dir.path().join("cifar-10-python.tar.gz");
    check_cifar10(&data::load_cifar10(&archive).expect("python archive"));
}

fn cifar100_binary(file: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for (record, (coarse, fine)) in [(3u8, 42u8), (19, 99)].into_iter().enumerate() {
        out.extend_from_slice(&[coarse, fine - file as u8]);
        out.extend_from_slice(&cifar_planar(file, record));
    }
    out
}

#[test]
fn cifar100_binary_coarse_and_fine() {
    let dir = tempfile::tempdir().expect("temp dir");
    write(&dir.path().join("train.bin"), &cifar100_binary(0));
    write(&dir.path().join("test.bin"), &cifar100_binary(1));
    let fine_names: String = (0..100).map(|i| format!("fine{i}\n")).collect();
    write(
        &dir.path().join("fine_label_names.txt"),
        fine_names.as_bytes(),
    );

    let fine = data::load_cifar100(dir.path(), false).expect("fine labels");
    assert_eq!(fine.classes, 100);
    assert_eq!(fine.train.labels, vec![42, 99]);
    assert_eq!(fine.test.labels, vec![41, 98]);
    assert_eq!(fine.class_names[42], "fine42");
    assert_hwc_matches(
        fine.train.image(1),
        &cifar_planar(0, 1),
        "fine train image 1",
    );

    let coarse = data::load_cifar100(dir.path(), true).expect("coarse labels");
    assert_eq!(coarse.classes, 20);
    assert_eq!(coarse.train.labels, vec![3, 19]);
    assert_eq!(
        coarse.class_names[0], "class 0",
        "no coarse name file was written"
    );
}

#[test]
fn cifar100_python_with_meta() {
    let dir = tempfile::tempdir().expect("temp dir");
    let keys = |fine: [u32; 2]| [("fine_labels", fine), ("coarse_labels", [7, 8])];
    write(
        &dir.path().join("cifar-100-python/train"),
        &cifar_python_batch(0, &keys([5, 6])),
    );
    write(
        &dir.path().join("cifar-100-python/test"),
        &cifar_python_batch(1, &keys([60, 61])),
    );

    let mut meta = Vec::new();
    pk::header(&mut meta);
    meta.extend_from_slice(b"}q\x00(");
    for (key, count) in [("fine_label_names", 100), ("coarse_label_names", 20)] {
        pk::bytes(&mut meta, key.as_bytes());
        meta.extend_from_slice(b"](");
        for i in 0..count {
            pk::bytes(&mut meta, format!("{key}-{i}").as_bytes());
        }
        meta.push(b'e');
    }
    meta.extend_from_slice(b"u.");
    write(&dir.path().join("cifar-100-python/meta"), &meta);

    let spec = DataSpec::parse(&format!("cifar100:{}", dir.path().display())).expect("spec");
    let fine = data::load(&spec).expect("fine");
    assert_eq!(fine.train.labels, vec![5, 6]);
    assert_eq!(fine.test.labels, vec![60, 61]);
    assert_eq!(fine.class_names[61], "fine_label_names-61");
    assert_hwc_matches(fine.test.image(0), &cifar_planar(1, 0), "test image 0");

    let spec = DataSpec::parse(&format!("cifar100-coarse:{}", dir.path().display())).expect("spec");
    let coarse = data::load(&spec).expect("coarse");
    assert_eq!(coarse.train.labels, vec![7, 8]);
    assert_eq!(coarse.class_names[19], "coarse_label_names-19");
}

#[test]
fn cifar_truncated_batch_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    for (file, name) in CIFAR10_BINARY.iter().enumerate() {
        let mut bytes = cifar10_binary_batch(file);
        if file == 2 {
            bytes.truncate(bytes.len() - 100);
        }
        write(&dir.path().join(name), &bytes);
    }
    let error = data::load_cifar10(dir.path()).expect_err("truncated batch");
    let message = error.to_string();
    assert!(message.contains("data_batch_3.bin"), "{message}");
    assert!(message.contains("truncated"), "{message}");
}

#[test]
fn cifar_label_out_of_range_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    for (file, name) in CIFAR10_BINARY.iter().enumerate() {
        let mut bytes = cifar10_binary_batch(file);
        if file == 5 {
            bytes[0] = 10;
        }
        write(&dir.path().join(name), &bytes);
    }
    let error = data::load_cifar10(dir.path()).expect_err("label 10");
    assert!(
        matches!(error, DataError::LabelOutOfRange { label: 10, .. }),
        "{error}"
    );
    assert!(error.to_string().contains("test_batch.bin"), "{error}");
}

#[test]
fn cifar_missing_files_listed() {
    let dir = tempfile::tempdir().expect("temp dir");
    write(
        &dir.path().join("data_batch_1.bin"),
        &cifar10_binary_batch(0),
    );
    let error = data::load_cifar10(dir.path()).expect_err("incomplete");
    let message = error.to_string();
    assert!(message.contains("data_batch_5.bin"), "{message}");
    assert!(message.contains("found data_batch_1.bin"), "{message}");
}

// ---------------------------------------------------------------- SVHN

/// Column-major SVHN value at (h, w, c, n).
fn svhn_value(h: usize, w: usize, c: usize, n: usize) -> u8 {
    ((h + 2 * w + 3 * c + 5 * n) % 256) as u8
}

fn svhn_file(labels: &[f64], offset: usize) -> Vec<u8> {
    let count = labels.len();
    let mut x = Vec::with_capacity(CIFAR_IMAGE * count);
    for n in 0..count {
        for c in 0..3 {
            for w in 0..32 {
                for h in 0..32 {
                    x.push(svhn_value(h, w, c, n + offset));
                }
            }
        }
    }
    let arrays = [
        MatArray {
            name: "X".into(),
            class: mat::MX_UINT8,
            dims: vec![32, 32, 3, count],
            data: MatData::U8(x),
        },
        MatArray {
            name: "y".into(),
            class: mat::MX_DOUBLE,
            dims: vec![count, 1],
            data: MatData::Numeric(labels.to_vec()),
        },
    ];
    mat::write::file(&arrays, true)
}

#[test]
fn svhn_compressed_mat_with_extra() {
    let dir = tempfile::tempdir().expect("temp dir");
    write(
        &dir.path().join("train_32x32.mat"),
        &svhn_file(&[10.0, 1.0, 5.0], 0),
    );
    write(&dir.path().join("test_32x32.mat"), &svhn_file(&[2.0], 100));
    write(
        &dir.path().join("extra_32x32.mat"),
        &svhn_file(&[10.0, 9.0], 50),
    );

    let spec = DataSpec::parse(&format!("svhn:{}", dir.path().display())).expect("spec");
    let svhn = data::load(&spec).expect("svhn");
    assert_eq!(svhn.train.labels, vec![0, 1, 5], "label 10 means digit 0");
    assert_eq!(svhn.test.labels, vec![2]);
    for n in 0..3 {
        let image = svhn.train.image(n);
        for (h, w, c) in [(0, 0, 0), (31, 0, 1), (0, 31, 2), (17, 5, 1), (31, 31, 2)] {
            let got = image[(h * 32 + w) * 3 + c];
            assert_eq!(got, svhn_value(h, w, c, n), "image {n} at ({h}, {w}, {c})");
        }
    }
    assert_eq!(
        svhn.test.image(0)[(3 * 32 + 4) * 3 + 2],
        svhn_value(3, 4, 2, 100)
    );

    let spec = DataSpec::parse(&format!("svhn+extra:{}", dir.path().display())).expect("spec");
    let extra = data::load(&spec).expect("svhn+extra");
    assert_eq!(extra.train.len, 5);
    assert_eq!(extra.train.labels, vec![0, 1, 5, 0, 9]);
    assert_eq!(extra.train.image(4)[(32 + 2) * 3], svhn_value(1, 2, 0, 51));
}

#[test]
fn svhn_missing_variable_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    let only_x = [MatArray {
        name: "X".into(),
        class: mat::MX_UINT8,
        dims: vec![32, 32, 3, 0],
        data: MatData::U8(Vec::new()),
    }];
    write(
        &dir.path().join("train_32x32.mat"),
        &mat::write::file(&only_x, true),
    );
    write(&dir.path().join("test_32x32.mat"), &svhn_file(&[2.0], 0));
    let error = data::load_svhn(dir.path(), false).expect_err("no y");
    let message = error.to_string();
    assert!(message.contains("train_32x32.mat"), "{message}");
    assert!(message.contains("no variable `y`"), "{message}");
}

#[test]
fn svhn_label_out_of_range() {
    let dir = tempfile::tempdir().expect("temp dir");
    write(
        &dir.path().join("train_32x32.mat"),
        &svhn_file(&[3.0, 11.0], 0),
    );
    write(&dir.path().join("test_32x32.mat"), &svhn_file(&[2.0], 0));
    let error = data::load_svhn(dir.path(), false).expect_err("label 11");
    assert!(
        matches!(
            error,
            DataError::LabelOutOfRange {
                index: 1,
                label: 11,
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn svhn_missing_extra_listed() {
    let dir = tempfile::tempdir().expect("temp dir");
    write(&dir.path().join("train_32x32.mat"), &svhn_file(&[3.0], 0));
    write(&dir.path().join("test_32x32.mat"), &svhn_file(&[2.0], 0));
    let error = data::load_svhn(dir.path(), true).expect_err("no extra");
    let message = error.to_string();
    assert!(message.contains("extra_32x32.mat"), "{message}");
    assert!(
        message.contains("found test_32x32.mat, train_32x32.mat"),
        "{message}"
    );
}

// ---------------------------------------------------------------- Fashion-MNIST

fn write_fashion(dir: &Path, compress: bool) {
    let images: Vec<u8> = (0..3 * 28 * 28).map(|i| (i % 253) as u8).collect();
    let files = [
        ("train-images-idx3-ubyte", encode_idx(&[3, 28, 28], &images)),
        ("train-labels-idx1-ubyte", encode_idx(&[3], &[9, 0, 4])),
        (
            "t10k-images-idx3-ubyte",
            encode_idx(&[1, 28, 28], &images[..784]),
        ),
        ("t10k-labels-idx1-ubyte", encode_idx(&[1], &[7])),
    ];
    for (name, bytes) in files {
        if compress {
            write(&dir.join(format!("{name}.gz")), &gzip(&bytes));
        } else {
            write(&dir.join(name), &bytes);
        }
    }
}

#[test]
fn fashion_idx_gzip_and_plain() {
    for compress in [true, false] {
        let dir = tempfile::tempdir().expect("temp dir");
        write_fashion(dir.path(), compress);
        let spec =
            DataSpec::parse(&format!("fashion-mnist:{}", dir.path().display())).expect("spec");
        let fashion = data::load(&spec).expect("fashion");
        assert_eq!(fashion.train.labels, vec![9, 0, 4], "compress = {compress}");
        assert_eq!(fashion.test.labels, vec![7]);
        assert_eq!(
            (
                fashion.train.height,
                fashion.train.width,
                fashion.train.channels
            ),
            (28, 28, 1)
        );
        let expected: Vec<u8> = (0..3 * 784).map(|i| (i % 253) as u8).collect();
        assert_eq!(fashion.train.images, expected);
        assert_eq!(fashion.class_names[9], "Ankle boot");
    }
}

#[test]
fn fashion_truncated_gzip_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    write_fashion(dir.path(), true);
    let path = dir.path().join("train-images-idx3-ubyte.gz");
    let bytes = std::fs::read(&path).expect("read");
    write(&path, &bytes[..bytes.len() / 2]);
    let error = read_idx(&path).expect_err("truncated gzip");
    assert!(
        error.to_string().contains("train-images-idx3-ubyte.gz"),
        "{error}"
    );
}

#[test]
fn fashion_label_count_mismatch() {
    let dir = tempfile::tempdir().expect("temp dir");
    write_fashion(dir.path(), false);
    write(
        &dir.path().join("train-labels-idx1-ubyte"),
        &encode_idx(&[2], &[1, 2]),
    );
    let error = data::load_fashion_mnist(dir.path()).expect_err("2 labels for 3 images");
    assert!(
        error.to_string().contains("train-labels-idx1-ubyte"),
        "{error}"
    );
}

// ---------------------------------------------------------------- ImageNet

fn encode_jpeg(pixels: &[u8], width: u16, height: u16, color: jpeg_encoder::ColorType) -> Vec<u8> {
    let mut out = Vec::new();
    jpeg_encoder::Encoder::new(&mut out, 95)
        .encode(pixels, width, height, color)
        .expect("encode JPEG");
    out
}

fn png_bytes(image: &RgbImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut out, image::ImageFormat::Png)
        .expect("encode PNG");
    out.into_inner()
}

/// Writes a small ILSVRC2012 tree: classes n01 and n02, odd image encodings,
/// and a flat validation folder labelled by the devkit.
fn write_imagenet(root: &Path) {
    let (w, h) = (40u16, 30u16);
    // Pure red in CMYK: no cyan, full magenta and yellow, no black.
    let cmyk: Vec<u8> = [0u8, 255, 255, 0].repeat(w as usize * h as usize);
    write(
        &root.join("train/n01/cmyk.JPEG"),
        &encode_jpeg(&cmyk, w, h, jpeg_encoder::ColorType::Cmyk),
    );
    let gray = vec![100u8; w as usize * h as usize];
    write(
        &root.join("train/n01/gray.JPEG"),
        &encode_jpeg(&gray, w, h, jpeg_encoder::ColorType::Luma),
    );
    let png = RgbImage::from_pixel(w as u32, h as u32, Rgb([10, 200, 30]));
    write(&root.join("train/n02/png_named.JPEG"), &png_bytes(&png));

    write(
        &root.join("val/ILSVRC2012_val_00000001.JPEG"),
        &png_bytes(&png),
    );
    write(
        &root.join("val/ILSVRC2012_val_00000002.JPEG"),
        &encode_jpeg(&gray, w, h, jpeg_encoder::ColorType::Luma),
    );

    // ILSVRC2012_ID 1 is n02 and 2 is n01, the reverse of the sorted order.
    let synset = |id: f64, wnid: &str| {
        vec![
            MatArray {
                name: String::new(),
                class: mat::MX_DOUBLE,
                dims: vec![1, 1],
                data: MatData::Numeric(vec![id]),
            },
            MatArray {
                name: String::new(),
                class: mat::MX_CHAR,
                dims: vec![1, wnid.len()],
                data: MatData::Text(wnid.into()),
            },
        ]
    };
    let synsets = MatArray {
        name: "synsets".into(),
        class: mat::MX_STRUCT,
        dims: vec![2, 1],
        data: MatData::Struct {
            fields: vec!["ILSVRC2012_ID".into(), "WNID".into()],
            values: [synset(1.0, "n02"), synset(2.0, "n01")].concat(),
        },
    };
    let devkit = root.join("ILSVRC2012_devkit_t12/data");
    write(
        &devkit.join("meta.mat"),
        &mat::write::file(&[synsets], false),
    );
    write(
        &devkit.join("ILSVRC2012_validation_ground_truth.txt"),
        b"1\n2\n",
    );
}

#[test]
fn imagenet_odd_jpegs_decode() {
    let dir = tempfile::tempdir().expect("temp dir");
    write_imagenet(dir.path());

    let cmyk = decode_image_file(&dir.path().join("train/n01/cmyk.JPEG"))
        .expect("CMYK JPEG")
        .to_rgb8();
    let pixel = cmyk.get_pixel(20, 15);
    assert!(
        pixel[0] > 230 && pixel[1] < 25 && pixel[2] < 25,
        "CMYK red decoded as {pixel:?}"
    );

    let gray = decode_image_file(&dir.path().join("train/n01/gray.JPEG"))
        .expect("gray JPEG")
        .to_rgb8();
    assert_eq!(gray.dimensions(), (40, 30));
    let pixel = gray.get_pixel(3, 3);
    assert!(
        pixel.0.iter().all(|&v| v.abs_diff(100) <= 2),
        "gray decoded as {pixel:?}"
    );

    let png =
        decode_image_file(&dir.path().join("train/n02/png_named.JPEG")).expect("PNG named .JPEG");
    assert_eq!(png.to_rgb8().get_pixel(0, 0), &Rgb([10, 200, 30]));
}

#[test]
fn imagenet_devkit_ground_truth() {
    let dir = tempfile::tempdir().expect("temp dir");
    write_imagenet(dir.path());
    let spec = DataSpec::parse(&format!("imagenet:{}", dir.path().display())).expect("spec");
    let Source::Files(imagenet) = data::open(&spec).expect("open") else {
        panic!("ImageNet must stream from files");
    };
    assert_eq!(imagenet.class_names, vec!["n01", "n02"]);
    let train: Vec<(String, u32)> = imagenet
        .train
        .iter()
        .map(|(p, l)| {
            (
                p.file_name().expect("name").to_string_lossy().into_owned(),
                *l,
            )
        })
        .collect();
    assert_eq!(
        train,
        vec![
            ("cmyk.JPEG".into(), 0),
            ("gray.JPEG".into(), 0),
            ("png_named.JPEG".into(), 1)
        ]
    );
    let labels: Vec<u32> = imagenet.test.iter().map(|(_, l)| *l).collect();
    assert_eq!(
        labels,
        vec![1, 0],
        "ID 1 is n02 (class 1), ID 2 is n01 (class 0)"
    );

    let error = data::load(&spec).expect_err("ImageNet does not load into memory");
    assert!(matches!(error, DataError::StreamingOnly { .. }), "{error}");
}

#[test]
fn imagenet_val_txt_and_kaggle_csv() {
    let dir = tempfile::tempdir().expect("temp dir");
    write_imagenet(dir.path());
    std::fs::remove_dir_all(dir.path().join("ILSVRC2012_devkit_t12")).expect("remove devkit");

    let csv = "ImageId,PredictionString\nILSVRC2012_val_00000001,n01 1 2 3 4\n\
               ILSVRC2012_val_00000002,n02 5 6 7 8 n02 1 1 1 1\n";
    write(&dir.path().join("LOC_val_solution.csv"), csv.as_bytes());
    let from_csv = data::open_imagenet(dir.path()).expect("csv labels");
    assert_eq!(
        from_csv.test.iter().map(|(_, l)| *l).collect::<Vec<_>>(),
        vec![0, 1]
    );

    std::fs::remove_file(dir.path().join("LOC_val_solution.csv")).expect("remove csv");
    write(
        &dir.path().join("val.txt"),
        b"ILSVRC2012_val_00000001.JPEG 1\nILSVRC2012_val_00000002.JPEG 1\n",
    );
    let from_txt = data::open_imagenet(dir.path()).expect("val.txt labels");
    assert_eq!(
        from_txt.test.iter().map(|(_, l)| *l).collect::<Vec<_>>(),
        vec![1, 1]
    );

    write(
        &dir.path().join("val.txt"),
        b"ILSVRC2012_val_00000001.JPEG 5\n",
    );
    let error = data::open_imagenet(dir.path()).expect_err("label 5 of 2 classes");
    assert!(error.to_string().contains("val.txt"), "{error}");
}

#[test]
fn imagenet_missing_ground_truth_listed() {
    let dir = tempfile::tempdir().expect("temp dir");
    write_imagenet(dir.path());
    std::fs::remove_dir_all(dir.path().join("ILSVRC2012_devkit_t12")).expect("remove devkit");
    let error = data::open_imagenet(dir.path()).expect_err("no ground truth");
    let message = error.to_string();
    assert!(message.contains("LOC_val_solution.csv"), "{message}");
    assert!(message.contains("found train, val"), "{message}");
}

#[test]
fn prefetcher_same_for_any_thread_count() {
    let dir = tempfile::tempdir().expect("temp dir");
    write_imagenet(dir.path());
    let imagenet = data::open_imagenet(dir.path()).expect("open");
    let files = Arc::new(imagenet.train.clone());
    let norm = imagenet.normalization();
    let config = BatchConfig::train(2, Augment::RandomResizedCrop { size: 8 }, 11);

    let run = |threads: usize, epoch: usize| -> Vec<data::Batch> {
        Prefetcher::new(Arc::clone(&files), &norm, &config, epoch, threads, 2)
            .collect::<Result<_, _>>()
            .expect("decode")
    };
    let one = run(1, 3);
    let three = run(3, 3);
    assert_eq!(one.len(), 1, "3 files in batches of 2, last dropped");
    assert_eq!(one, three);
    assert_eq!(one[0].images.len(), 2 * 8 * 8 * 3);

    let mut eval = BatchConfig::eval(2);
    eval.augment = Augment::ResizeCenterCrop {
        resize: 10,
        crop: 8,
    };
    let batches: Vec<data::Batch> =
        Prefetcher::new(Arc::new(imagenet.test.clone()), &norm, &eval, 0, 2, 1)
            .collect::<Result<_, _>>()
            .expect("decode val");
    assert_eq!(batches[0].labels, vec![1.0, 0.0]);
    // The first validation image is the PNG of constant (10, 200, 30).
    let red = (10.0 / 255.0 - data::IMAGENET_MEAN[0]) / data::IMAGENET_STD[0];
    assert!(
        (batches[0].images[0] - red).abs() < 1e-5,
        "{}",
        batches[0].images[0]
    );
}

/// Writes the ImageNet fixture plus `train/n02/broken.JPEG`, a JPEG header
/// followed by garbage, and returns the path of the broken file.
fn write_imagenet_with_broken_jpeg(root: &Path) -> PathBuf {
    write_imagenet(root);
    let broken = root.join("train/n02/broken.JPEG");
    write(&broken, b"\xff\xd8\xff\xe0\x00\x10JFIF\x00garbage");
    broken
}

#[test]
fn truncated_jpeg_error_names_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pixels: Vec<u8> = (0..160 * 120 * 3).map(|i| (i % 251) as u8).collect();
    let jpeg = encode_jpeg(&pixels, 160, 120, jpeg_encoder::ColorType::Rgb);
    let whole = dir.path().join("whole.JPEG");
    let truncated = dir.path().join("half.JPEG");
    write(&whole, &jpeg);
    write(&truncated, &jpeg[..jpeg.len() / 2]);

    let image = decode_image_file(&whole).expect("the whole file decodes");
    assert_eq!(image.width(), 160);
    assert_eq!(image.height(), 120);
    let error = decode_image_file(&truncated).expect_err("half a JPEG is undecodable");
    assert!(matches!(error, DataError::Decode { .. }), "{error:?}");
    assert!(error.to_string().contains("half.JPEG"), "{error}");
    assert!(error.to_string().contains("truncated"), "{error}");
}

#[test]
fn prefetcher_skips_corrupt_jpeg() {
    let dir = tempfile::tempdir().expect("temp dir");
    let broken = write_imagenet_with_broken_jpeg(dir.path());
    let imagenet = data::open_imagenet(dir.path()).expect("open");
    let names: Vec<_> = imagenet
        .train
        .iter()
        .map(|(path, _)| path.clone())
        .collect();
    assert_eq!(names[2], broken, "files are listed in sorted order");
    let mut config = BatchConfig::eval(4);
    config.augment = Augment::ResizeCenterCrop { resize: 8, crop: 8 };

    let mut prefetcher =
        Prefetcher::new(Arc::new(imagenet.train), &imagenet_norm(), &config, 0, 2, 2);
    let batch = prefetcher
        .next()
        .expect("one batch")
        .expect("the other images decode");
    assert!(prefetcher.next().is_none(), "4 files make one batch of 4");
    assert_eq!(batch.len, 3);
    assert_eq!(batch.indices, vec![0, 1, 3]);
    assert_eq!(batch.labels, vec![0.0, 0.0, 1.0]);
    assert_eq!(batch.images.len(), 3 * 8 * 8 * 3);
    let skipped = prefetcher.skipped();
    assert_eq!(skipped.len(), 1);
    assert_eq!(skipped[0].path, broken);
    assert!(!skipped[0].reason.is_empty());
}

#[test]
fn prefetcher_skip_keeps_other_samples() {
    let dir = tempfile::tempdir().expect("temp dir");
    write_imagenet_with_broken_jpeg(dir.path());
    let imagenet = data::open_imagenet(dir.path()).expect("open");
    let files = Arc::new(imagenet.train);
    let norm = imagenet_norm();
    let run = |batch_size: usize, threads: usize| {
        let config = BatchConfig::train(batch_size, Augment::RandomResizedCrop { size: 8 }, 5);
        let mut prefetcher = Prefetcher::new(Arc::clone(&files), &norm, &config, 1, threads, 2);
        let batches: Vec<data::Batch> = prefetcher
            .by_ref()
            .collect::<Result<_, _>>()
            .expect("only decode failures");
        (batches, prefetcher.skipped().len())
    };

    // One image per batch: the broken file's batch is left out entirely.
    let (singles, skipped) = run(1, 2);
    assert_eq!(skipped, 1);
    assert_eq!(singles.len(), 3);
    assert!(singles.iter().all(|b| b.indices != vec![2]));

    // In pairs, the broken file's partner trains alone, exactly as it does
    // in its own batch, whatever the thread count.
    let (pairs, skipped) = run(2, 1);
    assert_eq!(skipped, 1);
    assert_eq!(run(2, 3).0, pairs);
    assert_eq!(pairs.len(), 2);
    assert_eq!(pairs.iter().map(|b| b.len).sum::<usize>(), 3);
    let image_len = 8 * 8 * 3;
    for batch in &pairs {
        for (slot, index) in batch.indices.iter().enumerate() {
            let single = singles
                .iter()
                .find(|b| b.indices == vec![*index])
                .expect("every decodable image has a single batch");
            assert_eq!(
                batch.images[slot * image_len..(slot + 1) * image_len],
                single.images[..],
                "image {index}"
            );
            assert_eq!(batch.labels[slot], single.labels[0], "image {index}");
        }
    }
}

fn imagenet_norm() -> Normalization {
    Normalization {
        mean: data::IMAGENET_MEAN.to_vec(),
        std: data::IMAGENET_STD.to_vec(),
    }
}

// ---------------------------------------------------------------- CamVid

fn write_camvid_split(root: &Path, split: &str, count: usize, first_label: u8) {
    for i in 0..count {
        let image = RgbImage::from_fn(6, 5, |x, y| Rgb([x as u8 * 10 + i as u8, y as u8 * 20, 7]));
        let labels =
            GrayImage::from_fn(6, 5, |x, y| Luma([(first_label + x as u8 + y as u8) % 12]));
        let name = format!("{split}_{i:03}.png");
        image
            .save(root.join(split).join(&name))
            .expect("save image");
        labels
            .save(root.join(format!("{split}annot")).join(&name))
            .expect("save labels");
    }
}

fn write_camvid(root: &Path) {
    for split in [
        "train",
        "trainannot",
        "val",
        "valannot",
        "test",
        "testannot",
    ] {
        std::fs::create_dir_all(root.join(split)).expect("mkdir");
    }
    write_camvid_split(root, "train", 2, 0);
    write_camvid_split(root, "val", 1, 3);
    write_camvid_split(root, "test", 1, 5);
}

#[test]
fn camvid_segnet_layout() {
    let dir = tempfile::tempdir().expect("temp dir");
    write_camvid(dir.path());
    let spec = DataSpec::parse(&format!("camvid:{}", dir.path().display())).expect("spec");
    let camvid = data::load(&spec).expect("camvid");

    assert_eq!(camvid.train.len, 2);
    assert_eq!(camvid.val.as_ref().map(|v| v.len), Some(1));
    assert_eq!(camvid.test.len, 1);
    assert_eq!(
        (
            camvid.train.height,
            camvid.train.width,
            camvid.train.channels
        ),
        (5, 6, 3)
    );
    assert_eq!(camvid.ignore_label, Some(11));
    assert!(camvid.train.is_segmentation());
    for i in 0..2 {
        for (x, y) in [(0usize, 0usize), (5, 4), (2, 3)] {
            let pixel = &camvid.train.image(i)[(y * 6 + x) * 3..(y * 6 + x) * 3 + 3];
            assert_eq!(
                pixel,
                &[x as u8 * 10 + i as u8, y as u8 * 20, 7],
                "image {i} at ({x}, {y})"
            );
            assert_eq!(
                camvid.train.label(i)[y * 6 + x],
                ((x + y) % 12) as u32,
                "label {i} ({x}, {y})"
            );
        }
    }
    assert_eq!(camvid.test.label(0)[0], 5);

    let weights = camvid.class_weights.as_ref().expect("class weights");
    assert_eq!(weights.len(), 11);
    // Train labels x + y on a 6x5 grid reach 9, so class 10 never appears.
    assert!(
        weights[..10].iter().all(|&w| w > 0.0),
        "classes 0 to 9 appear: {weights:?}"
    );
    assert_eq!(weights[10], 0.0, "an absent class gets weight 0");
    // Labels x + y on a 6x5 grid: class 0 covers 1 pixel, class 5 covers 5.
    assert!((weights[0] / weights[5] - 5.0).abs() < 1e-4, "{weights:?}");
}

#[test]
fn camvid_label_out_of_range() {
    let dir = tempfile::tempdir().expect("temp dir");
    write_camvid(dir.path());
    let bad = GrayImage::from_pixel(6, 5, Luma([12]));
    bad.save(dir.path().join("testannot/test_000.png"))
        .expect("save");
    let error = data::load_camvid(dir.path()).expect_err("label 12");
    assert!(error.to_string().contains("test_000.png"), "{error}");
}

#[test]
fn camvid_random_crop_keeps_pairs() {
    let dir = tempfile::tempdir().expect("temp dir");
    write_camvid(dir.path());
    let camvid = data::load_camvid(dir.path()).expect("camvid");
    let config = BatchConfig::train(2, Augment::RandomCrop { size: 4 }, 3);
    let batch = Batcher::new(&camvid.train, &Normalization::unit(3), &config, 0)
        .next()
        .expect("one batch");
    assert_eq!((batch.height, batch.width), (4, 4));
    assert_eq!(batch.labels.len(), 2 * 16);
    // The label at each pixel is (x + y) % 12 and the red value is 10 x + i,
    // so the label follows from the pixel it sits on, whatever the crop and flip.
    for slot in 0..2 {
        let i = batch.indices[slot] as f32;
        for p in 0..16 {
            let red = batch.images[(slot * 16 + p) * 3] * 255.0;
            let green = batch.images[(slot * 16 + p) * 3 + 1] * 255.0;
            let (x, y) = (((red - i) / 10.0).round(), (green / 20.0).round());
            assert_eq!(
                batch.labels[slot * 16 + p],
                (x + y) % 12.0,
                "slot {slot} pixel {p}"
            );
        }
    }
}

// ---------------------------------------------------------------- Augmentation

fn cifar_like_split() -> data::Split {
    data::Split {
        images: (0..20 * 32 * 32 * 3).map(|i| (i * 7 % 256) as u8).collect(),
        labels: (0..20).map(|i| i % 10).collect(),
        height: 32,
        width: 32,
        channels: 3,
        len: 20,
    }
}

fn batches_with_threads(threads: usize, config: &BatchConfig, epoch: usize) -> Vec<data::Batch> {
    let split = cifar_like_split();
    let norm = Normalization {
        mean: vec![0.5; 3],
        std: vec![0.25; 3],
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("pool");
    pool.install(|| Batcher::new(&split, &norm, config, epoch).collect())
}

#[test]
fn augmentation_deterministic_across_threads() {
    let policies = [
        Augment::cifar(4, true),
        Augment::svhn(2, Some(1.0)),
        Augment::RandomResizedCrop { size: 24 },
        Augment::imagenet_eval(),
    ];
    for augment in policies {
        let config = BatchConfig::train(6, augment.clone(), 42);
        let one = batches_with_threads(1, &config, 2);
        let two = batches_with_threads(2, &config, 2);
        assert_eq!(one, two, "{augment:?}");
        assert_eq!(one.len(), 3, "20 samples in batches of 6, last dropped");
        let other_epoch = batches_with_threads(2, &config, 3);
        assert_ne!(one, other_epoch, "{augment:?}: epochs must differ");
    }
}

#[test]
fn cifar_crop_is_a_shifted_window() {
    let split = cifar_like_split();
    let config = BatchConfig::train(20, Augment::cifar(4, false), 9);
    let batch = Batcher::new(&split, &Normalization::unit(3), &config, 0)
        .next()
        .expect("batch");
    // Every output is the source shifted by (dy, dx) in [-4, 4] with zero fill.
    for slot in 0..20 {
        let source = split.image(batch.indices[slot]);
        let output: Vec<u8> = batch.images[slot * 3072..(slot + 1) * 3072]
            .iter()
            .map(|&v| (v * 255.0).round() as u8)
            .collect();
        let found = (-4..=4isize)
            .flat_map(|dy| (-4..=4isize).map(move |dx| (dy, dx)))
            .any(|(dy, dx)| {
                (0..32isize).all(|y| {
                    (0..32isize).all(|x| {
                        let (sy, sx) = (y + dy, x + dx);
                        let inside = (0..32).contains(&sy) && (0..32).contains(&sx);
                        (0..3).all(|c| {
                            let expected = if inside {
                                source[((sy * 32 + sx) * 3) as usize + c]
                            } else {
                                0
                            };
                            output[((y * 32 + x) * 3) as usize + c] == expected
                        })
                    })
                })
            });
        assert!(found, "slot {slot} is not a padded crop of its source");
        assert_eq!(batch.labels[slot], split.labels[batch.indices[slot]] as f32);
    }
}

// ---------------------------------------------------------------- Bundled subset

const BUNDLE_FILES: [(&str, usize); 4] = [
    ("train-images-idx3-ubyte.gz", 10_000),
    ("train-labels-idx1-ubyte.gz", 10_000),
    ("t10k-images-idx3-ubyte.gz", 2_000),
    ("t10k-labels-idx1-ubyte.gz", 2_000),
];

fn bundle_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/fashion-mnist")
}

#[test]
fn bundled_subset_loads() {
    let fashion =
        data::load(&DataSpec::parse("fashion-mnist").expect("spec")).expect("bundled subset");
    assert_eq!(fashion.train.len, 10_000);
    assert_eq!(fashion.test.len, 2_000);
    assert_eq!(fashion.classes, 10);
    let counts = fashion.train.class_counts(10, None);
    assert!(
        counts.iter().all(|&c| c > 800),
        "every class is represented: {counts:?}"
    );
    assert!(
        (fashion.mean[0] - 0.286).abs() < 0.01,
        "mean {:?}",
        fashion.mean
    );
    let total: u64 = BUNDLE_FILES
        .iter()
        .map(|(name, _)| {
            std::fs::metadata(bundle_dir().join(name))
                .expect("bundle file")
                .len()
        })
        .sum();
    assert!(total < 5_500_000, "bundle is {total} bytes");
}

/// Cuts the first items of the Debian package's Fashion-MNIST files into the
/// bundle when `LDNC_WRITE_BUNDLE=1`, and otherwise checks that the bundle is
/// exactly that cut. Skips when the package is not installed.
#[test]
fn bundled_subset_matches_debian_cut() {
    let source = Path::new(data::DEBIAN_FASHION_MNIST);
    if !source.join("train-images-idx3-ubyte.gz").is_file() {
        eprintln!("skipped: {} is not installed", source.display());
        return;
    }
    let write_bundle = std::env::var("LDNC_WRITE_BUNDLE").is_ok_and(|v| v == "1");
    for (name, count) in BUNDLE_FILES {
        let full = read_idx(&source.join(name)).expect("Debian file");
        let item: usize = full.dims[1..].iter().product();
        let mut dims = full.dims.clone();
        dims[0] = count;
        let cut = &full.data[..count * item];
        let target = bundle_dir().join(name);
        if write_bundle {
            let mut encoder = GzEncoder::new(Vec::new(), Compression::best());
            encoder.write_all(&encode_idx(&dims, cut)).expect("gzip");
            write(&target, &encoder.finish().expect("gzip"));
        }
        let bundled = read_idx(&target).expect("bundled file");
        assert_eq!(bundled.dims, dims, "{name}");
        assert!(
            bundled.data == cut,
            "{name} differs from the first {count} Debian items"
        );
    }
}

// ---------------------------------------------------------------- ldnc data inspect

#[test]
fn inspect_writes_report_and_sheet() {
    use clap::{Args, FromArgMatches};

    let dir = tempfile::tempdir().expect("temp dir");
    write_fashion(&dir.path().join("fashion"), true);
    let sheet = dir.path().join("sheet.png");
    let argv = [
        "data",
        "inspect",
        &format!("fashion-mnist:{}", dir.path().join("fashion").display()),
        "--verify",
        "--json",
        "--sheet",
        &sheet.display().to_string(),
        "--sheet-count",
        "3",
    ]
    .map(str::to_string);
    let command = cli_data::DataArgs::augment_args(clap::Command::new("data"));
    let matches = command.try_get_matches_from(argv).expect("valid arguments");
    let args = cli_data::DataArgs::from_arg_matches(&matches).expect("parsed arguments");

    cli_data::run(args, true).expect("inspect");
    let image = image::open(&sheet).expect("contact sheet PNG").to_rgb8();
    assert!(
        image.width() > 3 * 28 && image.height() > 28,
        "{:?}",
        image.dimensions()
    );
}

#[test]
fn inspect_verify_lists_corrupt_files() {
    let dir = tempfile::tempdir().expect("temp dir");
    write_imagenet(dir.path());
    write(
        &dir.path().join("train/n01/corrupt.JPEG"),
        b"\xff\xd8 not a jpeg",
    );
    let args = cli_data::DataArgs {
        command: cli_data::DataCommand::Inspect(cli_data::InspectArgs {
            spec: format!("imagenet:{}", dir.path().display()),
            json: false,
            verify: true,
            sheet: Some(dir.path().join("sheet.png")),
            sheet_count: 2,
        }),
    };
    let error = cli_data::run(args, true).expect_err("one corrupt file");
    assert!(error.to_string().contains("1 items failed"), "{error}");
}
