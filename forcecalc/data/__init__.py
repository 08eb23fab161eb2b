"""The OC20-EMT data set: generator, HDF5 store and reader, converters."""

from forcecalc.data.store import Dataset, DatasetWriter, FrameBatch, open_dataset, write_dataset

__all__ = ["Dataset", "DatasetWriter", "FrameBatch", "open_dataset", "write_dataset"]
