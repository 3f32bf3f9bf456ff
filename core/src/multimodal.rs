//! Images in a prompt, one entry point for `e4m3 run --image` and `e4m3 serve`: image bytes and a text
//! with one image marker per image become the prompt's token ids and the step inputs (image embeddings at
//! the image-token rows, one bidirectional group per image) that the text model and the serving engine
//! take. A second model family plugs in here, behind [`ImageEncoder::prompt`].

use std::path::Path;
use std::sync::Mutex;

use crate::backend::{check_supported, Backend, Runner, StepInputs};
use crate::cpu::CpuBackend;
use crate::error::{Error, Result};
use crate::image::gemma3_pixels_from_bytes;
use crate::vision::{expand_image_placeholders, prompt_inputs, VisionModel};

/// A prompt with images: token ids and the step inputs of its prompt positions.
#[derive(Debug, Clone)]
pub struct ImagePrompt {
    pub ids: Vec<u32>,
    pub inputs: StepInputs,
}

/// Why [`ImageEncoder::prompt`] failed: one image (its index among the images), or the prompt as a whole.
#[derive(Debug, Clone, PartialEq)]
pub enum ImagePromptError {
    Image { index: usize, message: String },
    Prompt(String),
}

impl std::fmt::Display for ImagePromptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImagePromptError::Image { index, message } => write!(f, "image {index}: {message}"),
            ImagePromptError::Prompt(m) => f.write_str(m),
        }
    }
}

/// The vision tower of a checkpoint with a runner for it, shared by the requests that send images (one
/// encode at a time).
pub struct ImageEncoder {
    vision: VisionModel,
    runner: Mutex<Box<dyn Runner>>,
    tower_backend: String,
    vocab_size: usize,
}

impl ImageEncoder {
    /// The image encoder of the checkpoint in `dir` (None when its config has no vision tower). The tower
    /// runs on `backend` when it has every op of the tower's graph, else on the CPU reference.
    pub fn load(
        dir: &Path,
        text_hidden_size: usize,
        vocab_size: usize,
        backend: &dyn Backend,
    ) -> Result<Option<ImageEncoder>> {
        let Some(vision) = VisionModel::load(dir, text_hidden_size)? else {
            return Ok(None);
        };
        let on: &dyn Backend = if check_supported(backend, &vision.graph).is_ok() {
            backend
        } else {
            &CpuBackend
        };
        let runner = vision.runner(on, 1)?;
        Ok(Some(ImageEncoder {
            tower_backend: on.name(),
            vision,
            runner: Mutex::new(runner),
            vocab_size,
        }))
    }

    /// The text that stands for one image in a prompt (a chat template writes it for an image part).
    pub fn marker(&self) -> &'static str {
        "<start_of_image>"
    }

    /// The backend the tower runs on.
    pub fn tower_backend(&self) -> &str {
        &self.tower_backend
    }

    /// Soft tokens one image takes in the prompt.
    pub fn tokens_per_image(&self) -> usize {
        self.vision.config.mm_tokens_per_image
    }

    /// The prompt of `text`, whose [`ImageEncoder::marker`]s stand for `images` (PNG, JPEG or WebP bytes)
    /// in order: the markers expanded as the model's processor does, tokenized by `tokenize`, and every
    /// image decoded, preprocessed and encoded once.
    pub fn prompt(
        &self,
        text: &str,
        images: &[&[u8]],
        tokenize: &dyn Fn(&str) -> Result<Vec<u32>>,
    ) -> std::result::Result<ImagePrompt, ImagePromptError> {
        let c = &self.vision.config;
        let (text, n) = expand_image_placeholders(text, c.mm_tokens_per_image);
        if n != images.len() {
            return Err(ImagePromptError::Prompt(format!(
                "the prompt has {n} image markers ({}) for {} images",
                self.marker(),
                images.len()
            )));
        }
        let pixels = images
            .iter()
            .enumerate()
            .map(|(index, bytes)| {
                gemma3_pixels_from_bytes(bytes, c.image_size)
                    .map_err(|message| ImagePromptError::Image { index, message })
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let prompt_err = |e: Error| ImagePromptError::Prompt(e.to_string());
        let ids = tokenize(&text).map_err(prompt_err)?;
        let mut features = crate::tensor::Mat::zeros(0, c.text_hidden_size);
        {
            let mut runner = self
                .runner
                .lock()
                .map_err(|_| ImagePromptError::Prompt("the image encoder failed earlier".into()))?;
            for (index, px) in pixels.iter().enumerate() {
                let (f, _) = self
                    .vision
                    .encode(runner.as_mut(), std::slice::from_ref(px), &[])
                    .map_err(|e| ImagePromptError::Image {
                        index,
                        message: format!("the vision tower failed: {e}"),
                    })?;
                features.data.extend_from_slice(&f.data);
                features.rows += f.rows;
            }
        }
        let inputs = prompt_inputs(&ids, c.image_token_id, &features, true).map_err(prompt_err)?;
        // As transformers: an image token outside the text vocabulary is embedded as padding (0), then
        // replaced.
        let ids = ids
            .into_iter()
            .map(|t| {
                if t == c.image_token_id && t as usize >= self.vocab_size {
                    0
                } else {
                    t
                }
            })
            .collect();
        Ok(ImagePrompt { ids, inputs })
    }
}
