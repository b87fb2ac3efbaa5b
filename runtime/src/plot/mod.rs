//! Plots: training curves and the connection matrix.
