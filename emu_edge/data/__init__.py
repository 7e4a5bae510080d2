"""emu_edge.data: procedural training and evaluation data (numpy and pillow only, no torch).

Images are np.uint8 [H, W, 3]; samples are sequences of segments (image, frames, text,
answer, target_image) that the training code wraps in its chat template. The caption
grammar is documented in `emu_edge.data.grammar` and GRAMMAR.md.
"""

from .grammar import (COUNT_WORDS, DIGIT_WORDS, DIRECTIONS, QUADRANTS, caption, corpus, digit_caption,
                      motion_caption, parse_caption)
from .handwritten import digit_image, digit_label, digit_split_indices, load_digits
from .scenes import (BACKGROUND, COLOURS, SHAPES, SIZES, SPLITS, Obj, Scene, random_scene, render, scene_split,
                     split_of)
from .tasks import (FEWSHOT_PATTERNS, N_FRAMES, SEGMENT_KINDS, TASKS, Sample, Segment, captioning, captioning_one,
                    chat, chat_one, check_tasks, digits, digits_one, fewshot, fewshot_one, mixture, one_object, questions, subject,
                    subject_one, text_to_image, text_to_image_one, video, video_one, vqa, vqa_one)

__all__ = [
    "BACKGROUND", "COLOURS", "COUNT_WORDS", "DIGIT_WORDS", "DIRECTIONS", "FEWSHOT_PATTERNS", "N_FRAMES", "QUADRANTS",
    "SEGMENT_KINDS", "SHAPES", "SIZES", "SPLITS", "TASKS", "Obj", "Sample", "Scene", "Segment", "caption", "captioning",
    "captioning_one", "chat", "chat_one", "check_tasks", "corpus", "digit_caption", "digit_image", "digit_label",
    "digit_split_indices", "digits", "digits_one", "fewshot", "fewshot_one", "load_digits", "mixture",
    "motion_caption", "one_object", "parse_caption", "questions", "random_scene", "render", "scene_split", "split_of", "subject",
    "subject_one", "text_to_image", "text_to_image_one", "video", "video_one", "vqa", "vqa_one",
]
