-- the two databases of deploy/compose.yaml (the image creates the user)
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
