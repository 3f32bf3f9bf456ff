//! Images in a prompt, one entry point for `e4m3 run --image` and `e4m3 serve`: image bytes and a text
//! with one image marker per image become the prompt's token ids and the step inputs (image embeddings at
//! the image-token rows, the family's bidirectional groups) that the text model and the serving engine
//! take. The model families (Gemma 3 SigLIP, Gemma 4 towers, the Gemma 4 12B embedder) live behind
//! [`ImageModel::prompt`]; this adds decoding and a tower runner kept for the requests that send images.

use std::path::Path;
use std::sync::Mutex;

use crate::backend::{check_supported, Backend, Runner};
use crate::config::Gemma3Config;
use crate::cpu::CpuBackend;
use crate::error::Result;
use crate::image::decode_rgb8;
use crate::vision::ImageModel;
pub use crate::vision::{ImagePrompt, ImagePromptError};

/// The vision tower of a checkpoint with a runner for it, shared by the requests that send images (one
/// encode at a time).
pub struct ImageEncoder {
    model: ImageModel,
    text_config: Gemma3Config,
    runner: Mutex<Box<dyn Runner>>,
    tower_backend: String,
}

impl ImageEncoder {
    /// The image encoder of the checkpoint in `dir` whose text config is `text_config` (None when its
    /// config has no vision tower). The tower runs on `backend` when it has every op of the tower's graph,
    /// else on the CPU reference.
    pub fn load(
        dir: &Path,
        text_config: &Gemma3Config,
        backend: &dyn Backend,
    ) -> Result<Option<ImageEncoder>> {
        let Some(model) = ImageModel::load(dir, text_config)? else {
            return Ok(None);
        };
        let on: &dyn Backend = if check_supported(backend, model.graph()).is_ok() {
            backend
        } else {
            &CpuBackend
        };
        let runner = model.runner(on)?;
        Ok(Some(ImageEncoder {
            tower_backend: on.name(),
            model,
            text_config: text_config.clone(),
            runner: Mutex::new(runner),
        }))
    }

    /// The text that stands for one image in a prompt (a chat template writes it for an image part).
    pub fn marker(&self) -> &'static str {
        self.model.marker()
    }

    /// The backend the tower runs on.
    pub fn tower_backend(&self) -> &str {
        &self.tower_backend
    }

    /// The prompt of `text`, whose [`ImageEncoder::marker`]s stand for `images` (PNG, JPEG or WebP bytes)
    /// in order: every image decoded, then [`ImageModel::prompt`].
    pub fn prompt(
        &self,
        text: &str,
        images: &[&[u8]],
        tokenize: &mut dyn FnMut(&str) -> Result<Vec<u32>>,
    ) -> std::result::Result<ImagePrompt, ImagePromptError> {
        let decoded = images
            .iter()
            .enumerate()
            .map(|(index, bytes)| {
                decode_rgb8(bytes).map_err(|message| ImagePromptError::Image { index, message })
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let mut runner = self
            .runner
            .lock()
            .map_err(|_| ImagePromptError::Prompt("the image encoder failed earlier".into()))?;
        self.model
            .prompt(runner.as_mut(), &self.text_config, &decoded, text, tokenize)
    }
}
