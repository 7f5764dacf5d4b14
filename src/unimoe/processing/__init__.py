"""Input processing: media loading and encoder features for images, video, speech and audio."""
