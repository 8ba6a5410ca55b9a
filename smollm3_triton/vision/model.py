"""runtime.py's import path for the vision side until it imports vision/encoder, loader and
prompt directly (a one-line change in runtime.py, which belongs to another branch); then
delete this file. Nothing else imports it."""
from .encoder import VisionModel
from .loader import load_vision
from .prompt import expand_images, split_image_parts, template_takes_parts

__all__ = ["VisionModel", "expand_images", "load_vision", "split_image_parts", "template_takes_parts"]
