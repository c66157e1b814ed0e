-- Run once by the postgres image on an empty data folder (after POSTGRES_DB "optuna" is created):
-- MLflow's backend store gets its own database, since Optuna and MLflow both keep an alembic_version table.
CREATE DATABASE mlflow OWNER sweep;
