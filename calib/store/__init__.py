"""The trace store: HDF5 trace files (:mod:`.traces`, docs/trace-format.md), opened by :mod:`.hdf5` (which refuses
whatever would make a read leave the file), the shards of a distributed run and their manifest (:mod:`.shards`,
docs/cluster.md), and ``calib merge`` (:mod:`.merge`)."""

from calib.store._attrs import (MAX_STEPS, PIPELINE_FIELDS, RESUME_FIELDS, pipeline_settings, settings_difference,
                                stored_settings)
from calib.store.traces import (FORECAST_ORDERS, FORECAST_VARIABLES, MODEL_ATTRS, REL_L1_SERIES,
                                RESERVED_FILE_ATTRS, SCHEMA_MINOR, SCHEMA_VERSION, SERIES, TraceSet, TraceWriter,
                                Trajectory, check_resume, precheck_resume, read_traces, served_call)
from calib.store.hdf5 import HDF5_SIGNATURE, is_hdf5_file, open_hdf5
