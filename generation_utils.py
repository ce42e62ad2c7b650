# Placeholder from the lead so modeling_dimple imports; the generation engineer replaces this whole file.
from transformers import GenerationConfig, GenerationMixin


class DimpleGenerationConfig(GenerationConfig):
    pass


class DimpleGenerationMixin(GenerationMixin):
    pass
