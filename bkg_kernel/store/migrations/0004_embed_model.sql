-- The embedding model that fills a collection's vectors from text ("candle:<model>" or "llmserver:<model>").
ALTER TABLE collections ADD COLUMN embed_model VARCHAR;
