"""One runner per stage type; each is a registered component (`register_stage_types`)."""
