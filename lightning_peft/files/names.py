"""The names on disk, in one place: the files of an adapter folder and the keys of lightning-peft's metadata."""

#: the adapter's tensors (HF PEFT's file name)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: the adapter's configuration (HF PEFT's file name)
ADAPTER_CONFIG = "adapter_config.json"
#: the files of an adapter folder (what a Hub download fetches)
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)

#: the key of lightning-peft's own metadata: in an adapter-only checkpoint, in ``adapter_config.json`` when the
#: JSON is not HF PEFT's, and in the safetensors header
METADATA_KEY = "lightning_peft"
#: the version of that metadata's layout
FORMAT_VERSION = 1
#: inside the metadata: the fingerprint of the base model (:mod:`lightning_peft.files.fingerprint`)
FINGERPRINT_KEY = "base_fingerprint"
#: inside the metadata: the lightning-peft version that wrote the folder
VERSION_KEY = "library_version"
#: in ``adapter_config.json``: the class names of a classifier, in class-index order (HF PEFT ignores the key)
LABEL_NAMES_KEY = "label_names"
#: AdapterHub's files (:mod:`lightning_peft.files.adapterhub`), fetched from the Hub too: a repository holds one
#: layout or the other
ADAPTERHUB_FILES = (
    "pytorch_adapter.bin",
    "adapter.safetensors",
    "head_config.json",
    "pytorch_model_head.bin",
    "model_head.safetensors",
    "adapter_fusion_config.json",
    "pytorch_model_adapter_fusion.bin",
    "model_adapter_fusion.safetensors",
)
