from .structtoken import StructTokenSegmentor, check_dataset_num_classes

__all__ = ["StructTokenSegmentor", "check_dataset_num_classes"]
