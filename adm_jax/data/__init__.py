"""Input pipeline: TFDS ArrayRecord + grain, ADM preprocessing, dataset builders.

Reading never imports TensorFlow (``tfds.data_source`` + grain + PIL); only building some
TFDS datasets (imagenet2012, lsun) does. See docs/data.md.
"""

from adm_jax.data.builders import (
    DEMO_DATASET_NAME,
    build_image_folder_dataset,
    prepare_demo_dataset,
)
from adm_jax.data.pipeline import (
    DATA_CONFIG_FIELDS,
    DATA_ITER_ITEM,
    DatasetLabelsError,
    DatasetNotPreparedError,
    TooManyCorruptImagesError,
    TrainIterator,
    create_eval_iterator,
    create_train_iterator,
    dataset_info,
    iterate_images,
    open_data_source,
    validate_data_config,
)
from adm_jax.data.preprocessing import (
    DecodeAndPreprocess,
    center_crop_arr,
    decode_image,
    random_crop_arr,
)

__all__ = [
    "DATA_CONFIG_FIELDS",
    "DATA_ITER_ITEM",
    "DEMO_DATASET_NAME",
    "DatasetLabelsError",
    "DatasetNotPreparedError",
    "DecodeAndPreprocess",
    "TooManyCorruptImagesError",
    "TrainIterator",
    "build_image_folder_dataset",
    "center_crop_arr",
    "create_eval_iterator",
    "create_train_iterator",
    "dataset_info",
    "decode_image",
    "iterate_images",
    "open_data_source",
    "prepare_demo_dataset",
    "random_crop_arr",
    "validate_data_config",
]
