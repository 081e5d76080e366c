"""Feature harvesting and the feature database: what dashboards and the browser show.

`harvest` streams a corpus through a model once and collects, for every feature of one or
several SAEs (`SAESource`), MLP layers (`NeuronSource`) or direction sets (`DirectionSource`),
exact top-k examples with context, a uniform sample for quantile sections, a histogram, the
density, mean and maximum; `write_harvest` stores the results with logit effects, decoder
neighbours and head shares in a SQLite file that `FeatureDB` reads.

Example:
    >>> import tempfile, pathlib
    >>> from mechscope.features import FeatureDB, NeuronSource, harvest, write_harvest
    >>> result = harvest(model, NeuronSource(model, 1), torch.randint(0, 50, (8, 8)), progress=False)
    >>> db = FeatureDB(write_harvest(result, model, pathlib.Path(tempfile.mkdtemp()) / "features.db"))
    >>> rec = db.feature(5)
    >>> rec.top[0].value == rec.max
    True
"""

from mechscope.features.database import FeatureDB, vocab_strings, write_harvest
from mechscope.features.effects import logit_effects, nearest_features, source_attribution
from mechscope.features.harvest import Harvest, HarvestConfig, harvest, harvest_sources, token_rows
from mechscope.features.records import Example, FeatureRecord, feature_records
from mechscope.features.site import export_site, page_name
from mechscope.features.sketch import FeatureSketch
from mechscope.features.sources import DirectionSource, FeatureSource, NeuronSource, SAESource, as_sources

__all__ = [
    "DirectionSource",
    "Example",
    "FeatureDB",
    "FeatureRecord",
    "FeatureSketch",
    "FeatureSource",
    "Harvest",
    "HarvestConfig",
    "NeuronSource",
    "SAESource",
    "as_sources",
    "export_site",
    "feature_records",
    "harvest",
    "harvest_sources",
    "logit_effects",
    "nearest_features",
    "page_name",
    "source_attribution",
    "token_rows",
    "vocab_strings",
    "write_harvest",
]
