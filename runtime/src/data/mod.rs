//! Datasets: readers for the official files, augmentation and batching.
