"""Readers and writers for the files nanoBragg uses (HKL, A.mat, sourcefile, SMV, PGM)."""
